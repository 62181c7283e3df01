//! `memaflow demo`: the default pipeline on real frames. Imports the models the default
//! pipeline (`models/pipeline.toml`, embedded) needs as the default model set
//! (`models/models.toml`, embedded) describes them — from the unpacked `mediapipe` wheel
//! (`target/fixtures/mediapipe`, made by `tests/fetch-fixtures`) or `../shared/models`,
//! each checked against its SHA-256; without the wheel's face mesh, `../shared/models`'
//! other export of it (`face_landmark_f32`, checked against that directory's `SHA256SUMS`)
//! stands in, with the pipeline's names for its outputs mapped to the export's — runs the
//! spool daemon once with that pipeline (face
//! detection → landmarks on each face's crop) over `../shared/frames` (generated frames
//! without it), writes one annotated picture per frame (`memaflow show`) and prints where.
//! A few zoo networks run beside it as timing workloads: their weights are pseudo-random,
//! so only their timings are shown, never a class.

use super::daemon::{self, RunOptions};
use super::schema::{FailureRecord, FrameResult, ModelOutcome, Outputs};
use crate::memory::Bytes;
use crate::model::package::Sha256;
use crate::model::{self, ColorOrder, Package, ResizeMode, zoo};
use anyhow::{Context, Result, bail};
use image::{Rgb, RgbImage};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Zoo networks small enough to generate in seconds: timing workloads, random weights.
const DEMO_ZOO: [&str; 2] = ["gendernet", "agenet"];

/// The appliance's default pipeline, as the Yocto image installs it: the demo runs this
/// text, so that what it shows is what a board runs.
const PIPELINE: &str = include_str!("../../models/pipeline.toml");
/// The default model set: where each model of the pipeline comes from and how it is
/// imported (the same options `models/build` gives `memaflow import`).
const MODEL_SET: &str = include_str!("../../models/models.toml");

/// Where the demo looks for the model set's `.tflite` files, relative to the working
/// directory (the checkout): the wheel's modules tree, by the manifest's path, then the
/// shared models beside the checkout, by file name.
const WHEEL_MODULES: &str = "target/fixtures/mediapipe";
const SHARED_MODELS: &str = "../shared/models";
/// The digests of the shared models, as `sha256sum` prints them.
const SHARED_SUMS: &str = "../shared/models/SHA256SUMS";

/// A model of the set whose published file may be replaced, when neither of the demo's
/// paths has it, by another export of the same network in `../shared/models`: checked
/// against `SHA256SUMS` there, imported with the set's options under the set's name, and
/// run by `models/pipeline.toml` with the names of its outputs mapped to the export's.
struct StandIn {
    model: &'static str,
    file: &'static str,
}

/// The face mesh as a float export (as on main before the model set): its outputs are
/// `conv2d_20`/`conv2d_30` where the wheel's `face_landmark.tflite` has `conv2d_21`/`conv2d_31`.
const STAND_INS: [StandIn; 1] = [StandIn {
    model: "face_landmark",
    file: "face_landmark_f32.tflite",
}];

/// The face mesh's points: 468 landmarks of x, y, z.
const MESH_VALUES: usize = 468 * 3;

/// `models/models.toml`, the parts the demo reads.
#[derive(Deserialize)]
struct ModelSet {
    model: Vec<SetModel>,
}

/// One model of the set. Unknown keys are refused: an import option added to the manifest
/// must not be silently left out of the demo's packages.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetModel {
    name: String,
    path: String,
    sha256: Sha256,
    range: Option<[f32; 2]>,
    resize: Option<ResizeMode>,
    color: Option<ColorOrder>,
}

impl SetModel {
    /// The import options `models/build` gives this model (`--range`, `--resize`,
    /// `--color`, memaflow import's defaults otherwise).
    fn import_options(&self) -> Result<model::ImportOptions> {
        let mut preprocess = model::Preprocess {
            resize: self.resize.unwrap_or(ResizeMode::Stretch),
            color: self.color.unwrap_or(ColorOrder::Rgb),
            ..Default::default()
        };
        if let Some([lo, hi]) = self.range {
            if lo == hi {
                bail!("{}: range takes two different numbers", self.name);
            }
            // pixel/255·(hi-lo) + lo  ==  (pixel - mean) / std, as `memaflow import --range`.
            let std = 255.0 / (hi - lo);
            preprocess.mean = vec![-lo * std];
            preprocess.std = vec![std];
        }
        Ok(model::ImportOptions {
            name: Some(self.name.clone()),
            preprocess,
            replace: true,
            ..Default::default()
        })
    }
}

/// The `[[model]]` entries of the pipeline: only their package names are read here.
#[derive(Deserialize)]
struct PipelineEntries {
    model: Vec<PipelineEntry>,
}

#[derive(Deserialize)]
struct PipelineEntry {
    path: String,
}

/// Where `memaflow demo` works without `--dir`.
pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join("memaflow-demo")
}

/// The default pipeline's packages and the pipeline's text for them (`models/pipeline.toml`,
/// with a stand-in's output names mapped), or the files that were looked for when a source
/// is not on this machine.
enum Pipeline {
    Ready {
        packages: Vec<Package>,
        text: String,
    },
    Missing(Vec<PathBuf>),
}

/// `memaflow demo`: imports the default pipeline's models, configures a spool, runs the
/// daemon once over the frames and draws each result into a picture; prints where they are.
pub fn run(dir: &Path) -> Result<()> {
    // The configuration names packages by absolute path: it lives in another directory.
    let dir = &std::path::absolute(dir).context("resolving the demo directory")?;
    let models = dir.join("models");
    let pipeline = prepare_pipeline(&models)?;
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
    let ready = match &pipeline {
        Pipeline::Ready { text, .. } => Some((models.as_path(), text.as_str())),
        Pipeline::Missing(_) => None,
    };
    std::fs::write(&config, config_text(&spool, ready, &zoo))
        .with_context(|| format!("writing {}", config.display()))?;
    match &pipeline {
        Pipeline::Ready { .. } => println!(
            "demo: the default pipeline (models/pipeline.toml: face detection → face landmarks) \
             on {} frames (and a damaged one), {} zoo networks beside it as timing workloads: \
             memaflow run --config {} --once",
            frames.len(),
            zoo.len(),
            config.display()
        ),
        Pipeline::Missing(looked) => println!(
            "demo: the default pipeline's models are not on this machine (looked for {}; \
             `bash tests/fetch-fixtures` fetches them from PyPI): only the zoo timing \
             workloads run: memaflow run --config {} --once",
            looked
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            config.display()
        ),
    }
    daemon::run(&RunOptions {
        config: config.clone(),
        board: None,
        once: true,
    })?;
    print_results(&spool, &dir.join("pictures"))?;
    let pipeline_packages = match &pipeline {
        Pipeline::Ready { packages, .. } => packages.as_slice(),
        Pipeline::Missing(_) => &[],
    };
    let total_weights: u64 = pipeline_packages
        .iter()
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

/// The daemon's configuration: the default pipeline (`pipeline`, its text) over the
/// packages in `models` (when they are there), then the zoo networks, summarised only (a
/// class from random weights would mean nothing).
fn config_text(spool: &Path, pipeline: Option<(&Path, &str)>, zoo: &[Package]) -> String {
    let mut text = format!(
        "# Written by `memaflow demo`; see docs/spool.md for every key.\n\
         [spool]\nroot = {:?}\n\n[run]\nbudget = \"128M\"\nparallel = 2\n",
        spool.display().to_string()
    );
    if let Some((models, pipeline)) = pipeline {
        text += &format!(
            "\n[models]\ndir = {:?}\n\n{pipeline}",
            models.display().to_string()
        );
    }
    for p in zoo {
        text += &format!("\n[[model]]\npath = {:?}\n", p.dir.display().to_string());
    }
    text
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

/// Every model the default pipeline runs, imported into `models` as the model set says;
/// `Missing` when a source file is on neither of the demo's paths and has no stand-in
/// there. A source with another digest than the manifest's (a stand-in: than
/// `SHA256SUMS`') is an error: it is not the published model.
fn prepare_pipeline(models: &Path) -> Result<Pipeline> {
    let set: ModelSet = toml::from_str(MODEL_SET).context("the embedded models/models.toml")?;
    let entries: PipelineEntries =
        toml::from_str(PIPELINE).context("the embedded models/pipeline.toml")?;
    let mut sources = vec![];
    let mut missing = vec![];
    for entry in &entries.model {
        let m = set
            .model
            .iter()
            .find(|m| m.name == entry.path)
            .with_context(|| {
                format!(
                    "models/pipeline.toml runs {}, which models/models.toml does not list",
                    entry.path
                )
            })?;
        let file = Path::new(&m.path).file_name().unwrap_or_default();
        let candidates = [
            Path::new(WHEEL_MODULES).join(&m.path),
            Path::new(SHARED_MODELS).join(file),
        ];
        if let Some(found) = candidates.iter().find(|p| p.is_file()) {
            sources.push((m, found.clone(), None));
            continue;
        }
        let stand_in = STAND_INS
            .iter()
            .find(|s| s.model == m.name)
            .map(|s| (s, Path::new(SHARED_MODELS).join(s.file)));
        match stand_in {
            Some((s, path)) if path.is_file() => sources.push((m, path, Some(s))),
            _ => missing.extend(candidates.into_iter().chain(stand_in.map(|(_, p)| p))),
        }
    }
    if !missing.is_empty() {
        return Ok(Pipeline::Missing(missing));
    }
    let mut packages = vec![];
    let mut pipeline: Option<toml::Table> = None;
    let mut stood_in = vec![];
    for (m, source, stand_in) in sources {
        let pkg_dir = models.join(&m.name);
        let Some(s) = stand_in else {
            packages.push(import(
                m,
                &source,
                (&m.sha256, "models/models.toml", &m.name),
                &pkg_dir,
            )?);
            continue;
        };
        let package = import(
            m,
            &source,
            (&shared_sum(s.file)?, SHARED_SUMS, s.file),
            &pkg_dir,
        )?;
        let table = match &mut pipeline {
            Some(t) => t,
            None => pipeline
                .insert(toml::from_str(PIPELINE).context("the embedded models/pipeline.toml")?),
        };
        let renamed = map_landmark_outputs(table, &package)?;
        let names = |i: usize| {
            renamed
                .iter()
                .map(|r: &[String; 2]| r[i].as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let said = format!(
            "{} from {SHARED_MODELS} stands in for {} (no {}): models/pipeline.toml's \
             outputs {} are its {}",
            Path::new(s.file)
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy(),
            m.name,
            Path::new(WHEEL_MODULES).join(&m.path).display(),
            names(0),
            names(1),
        );
        println!("demo: {said}");
        stood_in.push(said);
        packages.push(package);
    }
    let text = match pipeline {
        None => PIPELINE.to_string(),
        Some(table) => format!(
            "# models/pipeline.toml, but {}\n{}",
            stood_in.join("; "),
            toml::to_string(&table).context("writing the pipeline")?
        ),
    };
    Ok(Pipeline::Ready { packages, text })
}

/// In the pipeline `table`, the `[model.landmarks]` outputs of the entry that runs
/// `package` (a stand-in, by its name) renamed to the package's own: the points are its
/// output of 468 × 3 values, the presence score its output of one. Returns the [old, new]
/// names.
fn map_landmark_outputs(table: &mut toml::Table, package: &Package) -> Result<Vec<[String; 2]>> {
    let name = package.name();
    let entry = table
        .get_mut("model")
        .and_then(|m| m.as_array_mut())
        .and_then(|models| {
            models
                .iter_mut()
                .find(|e| e.get("path").and_then(|p| p.as_str()) == Some(name))
        })
        .with_context(|| format!("models/pipeline.toml runs no {name}"))?;
    let landmarks = entry
        .get_mut("landmarks")
        .and_then(|l| l.as_table_mut())
        .with_context(|| {
            format!("models/pipeline.toml: {name} has no [model.landmarks] for a stand-in's names")
        })?;
    let by_values = |n: usize| {
        package
            .manifest
            .outputs
            .iter()
            .find(|o| o.shape.iter().product::<usize>() == n)
            .map(|o| o.name.clone())
            .with_context(|| format!("{name}: no output of {n} values"))
    };
    let mut renamed = vec![];
    for (key, values) in [("points", MESH_VALUES), ("presence", 1)] {
        let to = by_values(values)?;
        let from = landmarks
            .insert(key.to_string(), toml::Value::String(to.clone()))
            .and_then(|v| v.as_str().map(str::to_string))
            .with_context(|| format!("models/pipeline.toml: {name} has no landmarks.{key}"))?;
        renamed.push([from, to]);
    }
    Ok(renamed)
}

/// The digest `../shared/models/SHA256SUMS` gives `file`.
fn shared_sum(file: &str) -> Result<Sha256> {
    let sums = std::fs::read_to_string(SHARED_SUMS)
        .with_context(|| format!("reading {SHARED_SUMS} to check {file}"))?;
    sums.lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .find(|(_, f)| f.trim_start().trim_start_matches('*') == file)
        .with_context(|| format!("{SHARED_SUMS} does not list {file}"))?
        .0
        .parse()
}

/// `source` checked against `digest` (`listed_in` gives it for `entry`) and imported into `pkg_dir` as the
/// model set says, unless a package imported from the same file with the same
/// preprocessing is already there.
fn import(
    m: &SetModel,
    source: &Path,
    (digest, listed_in, entry): (&Sha256, &str, &str),
    pkg_dir: &Path,
) -> Result<Package> {
    let bytes = std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    let got = Sha256::of(&bytes);
    if got != *digest {
        bail!(
            "{}: SHA-256 {got}, {listed_in} says {digest} for {entry}",
            source.display(),
        );
    }
    let options = m.import_options()?;
    let same_source = model::package::Source {
        file: source
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned(),
        bytes: bytes.len() as u64,
    };
    // An older memaflow's package (another format) does not open: imported again.
    if let Ok(p) = Package::open(pkg_dir)
        && p.manifest.source.as_ref() == Some(&same_source)
        && p.manifest.preprocess == options.preprocess
    {
        return Ok(p);
    }
    println!("demo: importing {}", source.display());
    model::import(source, pkg_dir, &options)?;
    Package::open(pkg_dir)
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
