//! `memaflow demo`: the default pipeline on real frames. Imports MediaPipe's face
//! detector and face landmark model (from `../shared/models` beside the checkout), runs
//! the spool daemon once with the face pipeline (detection → landmarks on each face's
//! crop) over `../shared/frames` (generated frames without it), writes one annotated
//! picture per frame (`memaflow show`) and prints where. A few zoo networks run beside it
//! as timing workloads: their weights are pseudo-random, so only their timings are shown,
//! never a class.

use super::daemon::{self, RunOptions};
use super::schema::{FailureRecord, FrameResult, ModelOutcome, Outputs};
use crate::memory::Bytes;
use crate::model::{self, Package, zoo};
use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use std::path::{Path, PathBuf};

/// Zoo networks small enough to generate in seconds: timing workloads, random weights.
const DEMO_ZOO: [&str; 2] = ["gendernet", "agenet"];
const DETECTOR: &str = "face_detection_short_range";
const LANDMARKS: &str = "face_landmark_f32";

/// The face pipeline: MediaPipe's detector decoding and its face-landmark region
/// (docs/spool.md, "Cascades"). `{detector}`, `{landmarks}`, `{points}`, `{presence}`
/// are filled in.
const FACE_PIPELINE: &str = r#"
[[model]]
path = "{detector}"
report = "boxes"
[model.preprocess]
resize = "letterbox"
[model.boxes]
boxes = "regressors"
scores = "classificators"
input_size = [128, 128]
strides = [8, 16, 16, 16]
keypoints = 6
nms = "weighted"

[[model]]
path = "{landmarks}"
report = "landmarks"
[model.input]
from = "face_detection_short_range"
rotate_by = [0, 1]
scale = 1.5
square = true
max = 8
[model.landmarks]
points = "{points}"
presence = "{presence}"
sigmoid = true
"#;

/// Where `memaflow demo` works without `--dir`.
pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join("memaflow-demo")
}

/// `memaflow demo`: imports the face models, configures a spool, runs the daemon once
/// over the frames and draws each result into a picture; prints where they are.
pub fn run(dir: &Path) -> Result<()> {
    // The configuration names packages by absolute path: it lives in another directory.
    let dir = &std::path::absolute(dir).context("resolving the demo directory")?;
    let face = prepare_face_models(dir)?;
    let zoo = prepare_zoo(dir)?;
    let frames = prepare_frames(dir)?;
    let spool = dir.join("spool");
    if spool.exists() {
        std::fs::remove_dir_all(&spool).with_context(|| format!("clearing {}", spool.display()))?;
    }
    let incoming = spool.join("incoming");
    std::fs::create_dir_all(&incoming)
        .with_context(|| format!("creating {}", incoming.display()))?;
    for f in &frames {
        if let Some(name) = f.file_name() {
            std::fs::copy(f, incoming.join(name))
                .with_context(|| format!("copying {}", f.display()))?;
        }
    }
    // A damaged frame too, to show where frames that cannot be processed go.
    if let Some(jpeg) = frames
        .iter()
        .find(|f| f.extension().is_some_and(|e| e == "jpg"))
    {
        let bytes = std::fs::read(jpeg).with_context(|| format!("reading {}", jpeg.display()))?;
        std::fs::write(incoming.join("truncated.jpg"), &bytes[..bytes.len() / 3])
            .context("writing the damaged frame")?;
    }
    let config = dir.join("memaflow.toml");
    std::fs::write(&config, config_text(&spool, face.as_ref(), &zoo)?)
        .with_context(|| format!("writing {}", config.display()))?;
    match &face {
        Some(_) => println!(
            "demo: face detection → face landmarks on {} frames (and a damaged one), \
             {} zoo networks beside it as timing workloads: memaflow run --config {} --once",
            frames.len(),
            zoo.len(),
            config.display()
        ),
        None => println!(
            "demo: no face models ({DETECTOR}.tflite and {LANDMARKS}.tflite are looked for \
             in ../shared/models): only the zoo timing workloads run: memaflow run --config {} --once",
            config.display()
        ),
    }
    daemon::run(&RunOptions {
        config: config.clone(),
        board: None,
        once: true,
    })?;
    print_results(&spool, &dir.join("pictures"))?;
    let total_weights: u64 = face
        .iter()
        .flat_map(|(d, l)| [d, l])
        .chain(&zoo)
        .map(|p| p.manifest.weight_bytes())
        .sum();
    println!(
        "demo: done; {} of weights in all; results in {}, status in {}",
        Bytes(total_weights),
        spool.join("out").display(),
        spool.join("status.json").display()
    );
    Ok(())
}

/// The landmark model's outputs: the points (468 × 3 values) and the presence score.
fn landmark_outputs(p: &Package) -> Result<(String, String)> {
    let find = |n: usize| {
        p.manifest
            .outputs
            .iter()
            .find(|o| o.shape.iter().product::<usize>() == n)
            .map(|o| o.name.clone())
            .with_context(|| format!("{}: no output of {n} values", p.name()))
    };
    Ok((find(468 * 3)?, find(1)?))
}

fn config_text(spool: &Path, face: Option<&(Package, Package)>, zoo: &[Package]) -> Result<String> {
    let mut text = format!(
        "# Written by `memaflow demo`; see docs/spool.md for every key.\n\
         [spool]\nroot = {:?}\n\n[run]\nbudget = \"128M\"\nparallel = 2\n",
        spool.display().to_string()
    );
    if let Some((detector, landmarks)) = face {
        let (points, presence) = landmark_outputs(landmarks)?;
        text += &FACE_PIPELINE
            .replace("{detector}", &detector.dir.display().to_string())
            .replace("{landmarks}", &landmarks.dir.display().to_string())
            .replace("{points}", &points)
            .replace("{presence}", &presence);
    }
    for p in zoo {
        // Summarised only: a class from random weights would mean nothing.
        text += &format!("\n[[model]]\npath = {:?}\n", p.dir.display().to_string());
    }
    Ok(text)
}

/// Per frame: the faces and landmarks found, the picture, and each zoo network's time.
fn print_results(spool: &Path, pictures: &Path) -> Result<()> {
    std::fs::create_dir_all(pictures)
        .with_context(|| format!("creating {}", pictures.display()))?;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(spool.join("out"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        let r = FrameResult::read(&path)?;
        let picture = pictures.join(format!("{}.png", r.frame));
        let drawn = super::show::show(&path, None, &picture)?;
        println!(
            "{:<16} {} face(s), {} landmarks, {:.0} ms: {}",
            r.frame,
            drawn.boxes,
            drawn.landmarks,
            r.time_ms.total,
            picture.display()
        );
        for m in &r.models {
            let line = match &m.outcome {
                ModelOutcome::Failed { error } => format!("error: {}", error.reason),
                ModelOutcome::Ran(run) => match (&run.outputs, run.time_ms) {
                    (Outputs::Summary(_), Some(t)) => format!(
                        "timing workload (random weights): {:.1} ms",
                        t.end - t.start
                    ),
                    (Outputs::Landmarks(c), _) => {
                        format!("landmarks on {} of {} face crop(s)", c.found, c.crops)
                    }
                    _ => continue,
                },
            };
            println!("{:<16}   {:<28} {line}", "", m.name);
        }
    }
    for e in std::fs::read_dir(spool.join("failed"))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".error.json") {
            let r = FailureRecord::read(&e.path())?;
            println!("{:<16} failed ({}): {}", r.frame, r.stage.name(), r.reason);
        }
    }
    Ok(())
}

fn prepare_zoo(dir: &Path) -> Result<Vec<Package>> {
    let mut out = vec![];
    for name in DEMO_ZOO {
        let pkg_dir = dir.join("models").join(name);
        if Package::open(&pkg_dir).is_err() {
            println!("demo: generating {name} (random weights: a timing workload)");
            zoo::entry(name)?.write(&pkg_dir, true)?;
        }
        out.push(Package::open(&pkg_dir)?);
    }
    Ok(out)
}

/// The face detector and landmark model, imported from `../shared/models` with their
/// published input ranges; `None` when they are not there.
fn prepare_face_models(dir: &Path) -> Result<Option<(Package, Package)>> {
    let shared = Path::new("../shared/models");
    let import = |name: &str, lo: f32, hi: f32| -> Result<Option<Package>> {
        let src = shared.join(format!("{name}.tflite"));
        if !src.is_file() {
            return Ok(None);
        }
        let pkg_dir = dir.join("models").join(name);
        if Package::open(&pkg_dir).is_err() {
            println!("demo: importing {}", src.display());
            let std = 255.0 / (hi - lo);
            let preprocess = model::Preprocess {
                mean: vec![-lo * std],
                std: vec![std],
                ..Default::default()
            };
            model::import(
                &src,
                &pkg_dir,
                &model::ImportOptions {
                    preprocess,
                    replace: true,
                    ..Default::default()
                },
            )?;
        }
        Ok(Some(Package::open(&pkg_dir)?))
    };
    Ok(import(DETECTOR, -1.0, 1.0)?.zip(import(LANDMARKS, 0.0, 1.0)?))
}

/// The shared photos (`../shared/frames`) when present, else three generated frames in
/// three formats (no faces in them: they show the formats and the timings).
fn prepare_frames(dir: &Path) -> Result<Vec<PathBuf>> {
    if let Ok(entries) = std::fs::read_dir("../shared/frames") {
        let mut shared: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        shared.sort();
        if !shared.is_empty() {
            return Ok(shared);
        }
    }
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames).with_context(|| format!("creating {}", frames.display()))?;
    let mut out = vec![];
    for (i, ext) in ["png", "jpg", "ppm"].iter().enumerate() {
        let path = frames.join(format!("synthetic-{i}.{ext}"));
        if !path.exists() {
            synthetic_frame(i as u32)
                .save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        out.push(path);
    }
    Ok(out)
}

/// A 320×240 gradient with a few discs: deterministic, and not a flat field.
fn synthetic_frame(seed: u32) -> RgbImage {
    RgbImage::from_fn(320, 240, |x, y| {
        let disc = |cx: u32, cy: u32, r: u32| {
            (x as i64 - cx as i64).pow(2) + (y as i64 - cy as i64).pow(2) < (r as i64).pow(2)
        };
        if disc(100 + 40 * seed, 120, 50) {
            Rgb([220, 180, 150])
        } else if disc(240, 80 + 30 * seed, 30) {
            Rgb([40, 60, 200])
        } else {
            Rgb([
                (x * 255 / 320) as u8,
                (y * 255 / 240) as u8,
                (64 * seed) as u8,
            ])
        }
    })
}
