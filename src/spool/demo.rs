//! `memaflow demo`: the embedded default. Generates a small model set (zoo networks, plus
//! the shared real models when `../shared/models` is beside the checkout), sample frames,
//! a spool and a configuration, runs the spool daemon over it once, and prints what came
//! out for every frame.

use super::daemon::{self, RunOptions};
use super::schema::{FailureRecord, FrameResult, ModelOutcome, ModelResult, Outputs};
use crate::memory::Bytes;
use crate::model::{self, Package, zoo};
use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use std::path::{Path, PathBuf};

/// Zoo networks small enough to generate in seconds.
const DEMO_ZOO: [&str; 3] = ["gendernet", "agenet", "sos_googlenet"];
/// Shared real models that import cleanly, with their published input ranges.
const SHARED_MODELS: [(&str, f32, f32); 3] = [
    ("face_detection_short_range", -1.0, 1.0),
    ("face_landmark_f32", 0.0, 1.0),
    ("hand_recrop", -1.0, 1.0),
];
/// How the demo reports the face detector: boxes from MediaPipe's anchor layout.
const FACE_DETECTOR_REPORT: &str = r#"report = "boxes"
[model.preprocess]
resize = "letterbox"
[model.boxes]
boxes = "regressors"
scores = "classificators"
input_size = [128, 128]
strides = [8, 16, 16, 16]
keypoints = 6
"#;

pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join("memaflow-demo")
}

pub fn run(dir: &Path) -> Result<()> {
    // The configuration names packages by absolute path: it lives in another directory.
    let dir = &std::path::absolute(dir).context("resolving the demo directory")?;
    let models = prepare_models(dir)?;
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
    std::fs::write(&config, config_text(&spool, &models))
        .with_context(|| format!("writing {}", config.display()))?;
    println!(
        "demo: {} models × {} frames (and a damaged one) through the spool daemon: \
         memaflow run --config {} --once",
        models.len(),
        frames.len(),
        config.display()
    );
    daemon::run(&RunOptions {
        config: config.clone(),
        board: None,
        once: true,
    })?;
    print_results(&spool)?;
    let total_weights: u64 = models.iter().map(|p| p.manifest.weight_bytes()).sum();
    println!(
        "demo: done; {} of weights in all; results in {}, status in {}",
        Bytes(total_weights),
        spool.join("out").display(),
        spool.join("status.json").display()
    );
    Ok(())
}

fn config_text(spool: &Path, models: &[Package]) -> String {
    let mut text = format!(
        "# Written by `memaflow demo`; see docs/spool.md for every key.\n\
         [spool]\nroot = {:?}\n\n[run]\nbudget = \"128M\"\nparallel = 2\n",
        spool.display().to_string()
    );
    for p in models {
        text += &format!("\n[[model]]\npath = {:?}\n", p.dir.display().to_string());
        if p.name() == "face_detection_short_range" {
            text += FACE_DETECTOR_REPORT;
        } else if p.manifest.outputs.iter().any(|o| o.labels.is_some()) {
            text += "report = \"topk\"\ntop_k = 1\n";
        }
    }
    text
}

/// One line per frame and model: the top class, the faces found, or the output's range.
fn print_results(spool: &Path) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(spool.join("out"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        let r = FrameResult::read(&path)?;
        for m in &r.models {
            let took = match &m.outcome {
                ModelOutcome::Ran(run) => run
                    .time_ms
                    .map_or("-".into(), |t| format!("{:.1}", t.end - t.start)),
                ModelOutcome::Failed { .. } => "-".into(),
            };
            println!(
                "{:<16} {:<28} {:<44} {took:>8} ms",
                r.frame,
                m.name,
                verdict(m)
            );
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

fn verdict(m: &ModelResult) -> String {
    let outputs = match &m.outcome {
        ModelOutcome::Failed { error } => return format!("error: {}", error.reason),
        ModelOutcome::Ran(run) => &run.outputs,
    };
    match outputs {
        Outputs::Boxes(d) => {
            let best = d.detections.iter().map(|d| d.score).fold(0.0, f32::max);
            match d.detections.len() {
                0 => "no face".into(),
                n => format!("{n} face(s), best score {best:.3}"),
            }
        }
        Outputs::Landmarks(c) => format!("landmarks on {} of {} crop(s)", c.found, c.crops),
        Outputs::Topk(outs) => match outs.first().and_then(|o| o.top.first()) {
            Some(top) => format!(
                "{} ({:.3})",
                top.label.clone().unwrap_or_else(|| top.index.to_string()),
                top.value
            ),
            None => "no outputs".into(),
        },
        Outputs::Summary(outs) => match outs.first() {
            Some(o) => format!("{} {:?} in [{:.3}, {:.3}]", o.name, o.shape, o.min, o.max),
            None => "no outputs".into(),
        },
        Outputs::Raw(outs) => format!("{} raw output(s)", outs.len()),
    }
}

fn prepare_models(dir: &Path) -> Result<Vec<Package>> {
    let mut out = vec![];
    for name in DEMO_ZOO {
        let pkg_dir = dir.join("models").join(name);
        if Package::open(&pkg_dir).is_err() {
            println!("demo: generating {name}");
            zoo::entry(name)?.write(&pkg_dir, true)?;
        }
        out.push(Package::open(&pkg_dir)?);
    }
    let shared = Path::new("../shared/models");
    for (name, lo, hi) in SHARED_MODELS {
        let src = shared.join(format!("{name}.tflite"));
        if !src.is_file() {
            continue;
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
        out.push(Package::open(&pkg_dir)?);
    }
    Ok(out)
}

/// Three generated frames in three formats, plus the shared photos when present.
fn prepare_frames(dir: &Path) -> Result<Vec<PathBuf>> {
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
    if let Ok(entries) = std::fs::read_dir("../shared/frames") {
        let mut shared: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        shared.sort();
        out.extend(shared);
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
