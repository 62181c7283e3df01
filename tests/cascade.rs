//! Cascades in the spool daemon: the default pipeline (`models/pipeline.toml`, face
//! detection → face landmarks) and palm detection → hand landmarks, on the default model
//! set's packages (`models/build` from the `mediapipe` wheel, `tests/fetch-fixtures`).
//!
//! - Every crop's landmarks equal the reference interpreter (ai-edge-litert's reference
//!   kernels) run on the same crop tensor (`[debug] dump_inputs`), mapped through the same
//!   region, within 1e-3 of the output's largest magnitude.
//! - On `astronaut.png` one face is found and its 468 landmarks agree with MediaPipe's own
//!   Python FaceMesh (static image mode) within 5 % of the face box's size, mean point
//!   distance; they lie inside the crop region.
//! - On a photo of several faces (a 2×2 mosaic built here from the astronaut's face:
//!   as is, mirrored, moved, moved and mirrored) each face gets its own landmarks, each set
//!   agreeing with FaceMesh's for that face.
//!
//! - On three photos of a hand (the npm package fingerpose's, `tests/fetch-fixtures`: the
//!   index finger straight, half and fully curled) one palm is found and the hand's 21
//!   landmarks agree with MediaPipe's own Python Hands (static image mode, model complexity
//!   0: the same lite pair) within 5 % of the palm box's size, mean point distance; they
//!   lie inside the crop region (rotated by wrist → middle finger, shifted, scaled by 2.6).

mod common;
use common::*;
use image::{GenericImageView, RgbImage, imageops};
use memaflow::runtime::{FloatTensor, npy};
use memaflow::spool::schema::{CropOutcome, Detection, FrameResult, Landmarks, Outputs, Roi};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const FACES: &str = "face_detection_short_range";
const MESH: &str = "face_landmark";
const PALMS: &str = "palm_detection_lite";
const HAND: &str = "hand_landmark_lite";
const MOSAIC: &str = "mosaic.png";
/// The hand photos, as `tests/fetch-fixtures` names them in `target/fixtures/hands`.
const HAND_PHOTOS: [&str; 3] = ["nocurl.jpg", "halfcurl.jpg", "fullcurl.jpg"];

fn mediapipe_dir() -> PathBuf {
    std::env::var("MEMAFLOW_MEDIAPIPE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target/fixtures/mediapipe"))
}

fn hands_dir() -> PathBuf {
    repo().join("target/fixtures/hands")
}

fn tflite(name: &str) -> PathBuf {
    let sub = match name {
        FACES => "face_detection",
        MESH => "face_landmark",
        PALMS => "palm_detection",
        _ => "hand_landmark",
    };
    mediapipe_dir().join(sub).join(format!("{name}.tflite"))
}

/// The pipeline under test: the default pipeline (`models/pipeline.toml`, face detection
/// → face landmarks), as the image and the demo run it, then a palm → hand cascade on the
/// model set's hand pair (MediaPipe's numbers; docs/spool.md, "Cascades"), all over the
/// model set's packages in `pkgs`.
fn config_text(spool: &Path, pkgs: &Path, dump: &Path) -> String {
    let pipeline = std::fs::read_to_string(repo().join("models/pipeline.toml")).unwrap();
    format!(
        r#"
[spool]
root = {spool:?}
[run]
frames_in_flight = 2
[debug]
dump_inputs = {dump:?}
[models]
dir = {pkgs:?}

{pipeline}
[[model]]
path = "{PALMS}"
report = "boxes"
[model.preprocess]
resize = "letterbox"
[model.boxes]
boxes = "Identity"
scores = "Identity_1"
input_size = [192, 192]
strides = [8, 16, 16, 16]
keypoints = 7
nms = "weighted"

[[model]]
path = "{HAND}"
report = "landmarks"
[model.input]
from = "{PALMS}"
rotate_by = [0, 2]
angle = 90
scale = 2.6
shift = [0.0, -0.5]
square = true
max = 2
[model.landmarks]
points = "Identity"
presence = "Identity_1"
"#
    )
}

/// Four faces: the astronaut's head as is, mirrored, moved, and moved and mirrored.
fn mosaic(astronaut: &Path) -> RgbImage {
    let photo = image::open(astronaut).unwrap().to_rgb8();
    let head = |x: u32, y: u32| photo.view(x, y, 256, 256).to_image();
    let quarters = [
        head(97, 0),
        imageops::flip_horizontal(&head(97, 0)),
        head(60, 24),
        imageops::flip_horizontal(&head(130, 16)),
    ];
    let mut out = RgbImage::new(512, 512);
    for (k, q) in quarters.iter().enumerate() {
        let (x, y) = ((k % 2) as i64 * 256, (k / 2) as i64 * 256);
        imageops::replace(&mut out, q, x, y);
    }
    out
}

struct Run {
    dir: PathBuf,
    /// Results by frame name.
    results: Vec<(String, FrameResult)>,
}

impl Run {
    fn result(&self, frame: &str) -> &FrameResult {
        &self.results.iter().find(|(f, _)| f == frame).unwrap().1
    }

    fn frame_path(&self, frame: &str) -> PathBuf {
        self.dir.join("frames").join(frame)
    }
}

/// Builds the model set, runs the daemon once over the photos, reads the results;
/// `None` (recorded as a skip) without the fixtures. Shared by the tests.
fn run() -> Option<&'static Run> {
    static RUN: OnceLock<Option<Run>> = OnceLock::new();
    RUN.get_or_init(|| {
        let astronaut = shared().join("frames/astronaut.png");
        let missing: Vec<PathBuf> = [FACES, MESH, PALMS, HAND]
            .map(tflite)
            .into_iter()
            .chain(HAND_PHOTOS.map(|f| hands_dir().join(f)))
            .chain([astronaut.clone()])
            .filter(|p| !p.is_file())
            .collect();
        if !missing.is_empty() {
            let reason =
                format!("missing {missing:?}: run tests/fetch-fixtures (needs PyPI and npm)");
            assert!(
                std::env::var("MEMAFLOW_REQUIRE_REFERENCE").as_deref() != Ok("1"),
                "{reason}"
            );
            skip("cascade", &reason);
            return None;
        }
        let dir = scratch("cascade");
        // The model set's packages, made as the image makes them.
        let pkgs = dir.join("pkgs");
        let built = models_build(&mediapipe_dir(), &pkgs, &repo().join("models/models.toml"));
        assert!(
            built.status.success(),
            "{}",
            String::from_utf8_lossy(&built.stderr)
        );
        let frames = dir.join("frames");
        std::fs::create_dir_all(&frames).unwrap();
        std::fs::copy(&astronaut, frames.join("astronaut.png")).unwrap();
        mosaic(&astronaut).save(frames.join(MOSAIC)).unwrap();
        for f in HAND_PHOTOS {
            std::fs::copy(hands_dir().join(f), frames.join(f)).unwrap();
        }
        let spool = dir.join("spool");
        std::fs::create_dir_all(spool.join("incoming")).unwrap();
        let all: Vec<&str> = ["astronaut.png", MOSAIC]
            .into_iter()
            .chain(HAND_PHOTOS)
            .collect();
        for f in &all {
            std::fs::copy(frames.join(f), spool.join("incoming").join(f)).unwrap();
        }
        let config = dir.join("memaflow.toml");
        std::fs::write(&config, config_text(&spool, &pkgs, &dir.join("dump"))).unwrap();
        let out = run_cli(
            &[
                "run",
                "--config",
                config.to_str().unwrap(),
                "--board",
                "pi4-2g",
                "--once",
            ],
            Duration::from_secs(600),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let results = all
            .iter()
            .map(|f| {
                let r = FrameResult::read(&spool.join(format!("out/{f}.json")))
                    .unwrap_or_else(|e| panic!("{e:#}"));
                (f.to_string(), r)
            })
            .collect();
        Some(Run { dir, results })
    })
    .as_ref()
}

fn detections<'a>(r: &'a FrameResult, model: &str) -> &'a [Detection] {
    let m = r.model(model).unwrap_or_else(|| panic!("no {model}"));
    &m.detections()
        .unwrap_or_else(|| panic!("{model}: {:?}", m.error()))
        .detections
}

/// The landmarks of `model` on detection `d`, with the crop's region.
fn landmarks<'a>(d: &'a Detection, model: &str) -> (&'a Roi, &'a Landmarks) {
    let c = d.crops.iter().find(|c| c.model == model).unwrap();
    match &c.outcome {
        CropOutcome::Ran(l) => (c.roi.as_ref().unwrap(), l),
        CropOutcome::Failed { error } => panic!("{model}: {error:?}"),
    }
}

#[test]
fn every_crop_equals_the_reference_interpreter_on_the_same_tensor() {
    let Some(run) = run() else { return };
    let mut checked = [0usize; 2];
    for (k, (source, cascade, w)) in [(FACES, MESH, 192f32), (PALMS, HAND, 224f32)]
        .into_iter()
        .enumerate()
    {
        let mut inputs: Vec<FloatTensor> = vec![];
        let mut ours: Vec<(&Roi, &Landmarks)> = vec![];
        for (frame, r) in &run.results {
            for (i, d) in detections(r, source).iter().enumerate() {
                if d.crops.is_empty() {
                    continue; // beyond input.max
                }
                let dumped = run.dir.join(format!("dump/{frame}/{cascade}.{i}.npy"));
                inputs.push(FloatTensor::from(npy::read(&dumped).unwrap()));
                ours.push(landmarks(d, cascade));
            }
        }
        assert!(!ours.is_empty(), "{source} gave {cascade} no crop");
        let test = format!("cascade-{cascade}");
        let Some(reference) = litert(&test, &tflite(cascade), &inputs) else {
            return;
        };
        for ((roi, got), want) in ours.iter().zip(&reference) {
            // Output 0 is the points in input pixels, output 1 the presence.
            let raw = &want[0].data;
            let scale = raw.iter().fold(0f32, |m, v| m.max(v.abs()));
            // An input pixel is roi.size / w frame pixels; x and y mix under rotation.
            let tolerance = 1e-3 * scale * roi.size[0] / w * 2f32.sqrt();
            assert_eq!(got.points.len() * 3, raw.len());
            for (p, q) in got.points.iter().zip(raw.chunks_exact(3)) {
                let [x, y] = roi.to_frame(q[0] / w, q[1] / w);
                let off = ((p[0] - x).powi(2) + (p[1] - y).powi(2)).sqrt();
                assert!(off <= tolerance, "{cascade}: {off} px off (≤ {tolerance})");
            }
            let presence = want[1].data[0];
            let presence = if cascade == MESH {
                1.0 / (1.0 + (-presence).exp())
            } else {
                presence
            };
            assert!((got.presence.unwrap() - presence).abs() <= 1e-3);
            checked[k] += 1;
        }
    }
    eprintln!(
        "checked {} face and {} hand crops against the reference",
        checked[0], checked[1]
    );
}

/// MediaPipe's own Python solution `script` (`tests/reference/`) on `image`, up to `max`
/// faces or hands: each one's points in pixels; `None` (recorded as a skip) without the
/// wheel's Python solutions.
fn mediapipe_points(script: &str, image: &Path, max: usize) -> Option<Vec<Vec<[f32; 2]>>> {
    let python = std::env::var("MEMAFLOW_MEDIAPIPE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target/fixtures/mediapipe-py/bin/python"));
    let out = Command::new(&python)
        .arg(repo().join("tests/reference").join(script))
        .arg(image)
        .arg(max.to_string())
        .output();
    match out {
        Ok(o) if o.status.success() => Some(serde_json::from_slice(&o.stdout).unwrap()),
        other => {
            let reason = format!(
                "MediaPipe's {script} ({}) did not run: {:?}; run tests/fetch-fixtures",
                python.display(),
                other.map(|o| String::from_utf8_lossy(&o.stderr).to_string())
            );
            assert!(
                std::env::var("MEMAFLOW_REQUIRE_REFERENCE").as_deref() != Ok("1"),
                "{reason}"
            );
            skip(&format!("cascade-{script}"), &reason);
            None
        }
    }
}

/// MediaPipe's FaceMesh on `image`: each face's 468 points in pixels.
fn face_mesh(image: &Path, max_faces: usize) -> Option<Vec<Vec<[f32; 2]>>> {
    mediapipe_points("face_mesh.py", image, max_faces)
}

/// Mean distance between corresponding points.
fn mean_distance(a: &[[f32; 3]], b: &[[f32; 2]]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(p, q)| ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2)).sqrt())
        .sum::<f32>()
        / a.len() as f32
}

fn box_size(d: &Detection) -> f32 {
    (d.bbox[2] - d.bbox[0]).max(d.bbox[3] - d.bbox[1])
}

/// Whether `p` lies in the rotated rectangle `roi`.
fn inside(roi: &Roi, p: &[f32; 3]) -> bool {
    let (s, c) = roi.rotation.sin_cos();
    let (dx, dy) = (p[0] - roi.center[0], p[1] - roi.center[1]);
    let (u, v) = (c * dx + s * dy, -s * dx + c * dy);
    u.abs() <= roi.size[0] / 2.0 && v.abs() <= roi.size[1] / 2.0
}

#[test]
fn one_face_on_the_astronaut_agrees_with_mediapipe_face_mesh() {
    let Some(run) = run() else { return };
    let r = run.result("astronaut.png");
    let faces = detections(r, FACES);
    assert_eq!(faces.len(), 1, "{faces:?}");
    let (roi, mesh) = landmarks(&faces[0], MESH);
    assert!(mesh.present, "presence {:?}", mesh.presence);
    assert_eq!(mesh.points.len(), 468);
    assert!(
        mesh.points.iter().all(|p| inside(roi, p)),
        "outside {roi:?}"
    );
    let [x0, y0, x1, y1] = faces[0].bbox;
    let in_box = mesh
        .points
        .iter()
        .filter(|p| (x0..=x1).contains(&p[0]) && (y0..=y1).contains(&p[1]))
        .count();
    // The detector's box is eyes-to-mouth tight; the mesh's outline (forehead, jaw)
    // reaches a little beyond it.
    assert!(in_box * 10 >= mesh.points.len() * 9, "{in_box} in the box");
    let Some(reference) = face_mesh(&run.frame_path("astronaut.png"), 4) else {
        return;
    };
    assert_eq!(reference.len(), 1, "FaceMesh finds one face");
    let off = mean_distance(&mesh.points, &reference[0]) / box_size(&faces[0]);
    eprintln!(
        "astronaut: mean distance to FaceMesh {:.2} % of the box; {in_box} of 468 points in the box",
        off * 100.0
    );
    assert!(off <= 0.05, "{:.2} % of the box", off * 100.0);
}

#[test]
fn each_face_of_a_group_gets_its_own_landmarks() {
    let Some(run) = run() else { return };
    let r = run.result(MOSAIC);
    let faces = detections(r, FACES);
    assert_eq!(faces.len(), 4, "one face per quarter: {faces:?}");
    let cascade = r.model(MESH).unwrap();
    assert!(
        matches!(cascade.outputs(), Some(Outputs::Landmarks(c)) if c.crops == 4 && c.found == 4),
        "{cascade:?}"
    );
    let reference = face_mesh(&run.frame_path(MOSAIC), 8);
    let mut quarters = vec![];
    for d in faces {
        let (roi, mesh) = landmarks(d, MESH);
        assert_eq!(mesh.points.len(), 468);
        // Its points are about its own face: their centre lies in its own box.
        let n = mesh.points.len() as f32;
        let cx = mesh.points.iter().map(|p| p[0]).sum::<f32>() / n;
        let cy = mesh.points.iter().map(|p| p[1]).sum::<f32>() / n;
        let [x0, y0, x1, y1] = d.bbox;
        assert!(
            x0 <= cx && cx <= x1 && y0 <= cy && cy <= y1,
            "{cx},{cy} vs {:?}",
            d.bbox
        );
        assert!(mesh.points.iter().all(|p| inside(roi, p)));
        quarters.push((cx >= 256.0, cy >= 256.0));
        if let Some(reference) = &reference {
            let off = reference
                .iter()
                .map(|f| mean_distance(&mesh.points, f))
                .fold(f32::INFINITY, f32::min)
                / box_size(d);
            assert!(off <= 0.05, "{:.2} % of the box", off * 100.0);
        }
    }
    quarters.sort();
    quarters.dedup();
    assert_eq!(quarters.len(), 4, "one face in each quarter");
    if let Some(reference) = reference {
        assert_eq!(reference.len(), 4, "FaceMesh finds the four faces too");
    }
}

#[test]
fn each_hand_photo_agrees_with_mediapipe_hands() {
    let Some(run) = run() else { return };
    for photo in HAND_PHOTOS {
        let palms = detections(run.result(photo), PALMS);
        assert_eq!(palms.len(), 1, "{photo}: {palms:?}");
        let (roi, hand) = landmarks(&palms[0], HAND);
        assert!(hand.present, "{photo}: presence {:?}", hand.presence);
        assert_eq!(hand.points.len(), 21);
        assert!(
            hand.points.iter().all(|p| inside(roi, p)),
            "{photo}: outside {roi:?}"
        );
        let Some(reference) = mediapipe_points("hands.py", &run.frame_path(photo), 2) else {
            return;
        };
        assert_eq!(
            reference.len(),
            1,
            "{photo}: MediaPipe's Hands finds one hand"
        );
        let off = mean_distance(&hand.points, &reference[0]) / box_size(&palms[0]);
        eprintln!(
            "{photo}: mean distance to MediaPipe's Hands {:.2} % of the palm box",
            off * 100.0
        );
        assert!(off <= 0.05, "{photo}: {:.2} % of the palm box", off * 100.0);
    }
}

#[test]
fn show_draws_the_result_on_the_frame() {
    let Some(run) = run() else { return };
    let result = run.dir.join("spool/out/astronaut.png.json");
    let picture = run.dir.join("astronaut-shown.png");
    // The frame by default from the spool's done/, as the daemon left it.
    let printed = cli_ok(&[
        "show",
        result.to_str().unwrap(),
        "--out",
        picture.to_str().unwrap(),
    ]);
    let r = run.result("astronaut.png");
    let points: usize = [(FACES, MESH), (PALMS, HAND)]
        .iter()
        .flat_map(|(source, cascade)| {
            detections(r, source)
                .iter()
                .filter(|d| !d.crops.is_empty())
                .map(|d| landmarks(d, cascade).1.points.len())
        })
        .sum();
    assert!(
        printed.contains(&format!("{points} landmark(s)")),
        "{printed}"
    );
    let frame = image::open(run.frame_path("astronaut.png"))
        .unwrap()
        .to_rgb8();
    let shown = image::open(&picture).unwrap().to_rgb8();
    assert_eq!(shown.dimensions(), frame.dimensions());
    let face = &detections(run.result("astronaut.png"), FACES)[0];
    let [x0, y0, x1, _] = face.bbox.map(|v| v as u32);
    // The box's top edge is drawn; a corner far from every finding is untouched.
    let changed = (x0..=x1)
        .filter(|&x| shown.get_pixel(x, y0) != frame.get_pixel(x, y0))
        .count();
    assert!(
        changed * 10 >= (x1 - x0) as usize * 9,
        "{changed} pixels of the top edge"
    );
    assert_eq!(shown.get_pixel(5, 500), frame.get_pixel(5, 500));
    // Landmarks are dots, not single pixels: the pixel 2 px right of each is drawn too.
    let (_, marks) = landmarks(face, MESH);
    let dotted = marks
        .points
        .iter()
        .map(|p| (p[0] as u32 + 2, p[1] as u32))
        .filter(|&(x, y)| x < shown.width() && y < shown.height())
        .filter(|&(x, y)| shown.get_pixel(x, y) != frame.get_pixel(x, y))
        .count();
    assert!(
        dotted * 10 >= marks.points.len() * 9,
        "{dotted} of {} landmarks drawn beyond their own pixel",
        marks.points.len()
    );
    // A frame of another size is refused.
    let small = run.dir.join("small.png");
    RgbImage::new(16, 16).save(&small).unwrap();
    let out = run_cli(
        &[
            "show",
            result.to_str().unwrap(),
            "--frame",
            small.to_str().unwrap(),
            "--out",
            picture.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("16×16"));
}
