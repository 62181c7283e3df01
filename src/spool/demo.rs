//! `memaflow demo`: the embedded default. Generates a small model set (zoo networks, plus
//! the shared real models when `../shared/models` is beside the checkout), sample frames,
//! a spool and a configuration, runs the spool daemon over it once, and prints what came
//! out for every frame.

use super::daemon::{self, RunOptions};
use crate::memory::Bytes;
use crate::model::{self, Package, zoo};
use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use serde_json::Value;
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
        let text = std::fs::read_to_string(&path)?;
        let r: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let frame = r["frame"].as_str().unwrap_or("?");
        for m in r["models"].as_array().into_iter().flatten() {
            println!(
                "{frame:<16} {:<28} {:<44} {:>8} ms",
                m["name"].as_str().unwrap_or("?"),
                verdict(m),
                m["time_ms"]["end"]
                    .as_f64()
                    .zip(m["time_ms"]["start"].as_f64())
                    .map_or("-".into(), |(e, s)| format!("{:.1}", e - s)),
            );
        }
    }
    for e in std::fs::read_dir(spool.join("failed"))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".error.json") {
            let r: Value = serde_json::from_str(&std::fs::read_to_string(e.path())?)?;
            println!(
                "{:<16} failed ({}): {}",
                r["frame"].as_str().unwrap_or("?"),
                r["stage"].as_str().unwrap_or("?"),
                r["reason"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}

fn verdict(m: &Value) -> String {
    if let Some(e) = m.get("error") {
        return format!("error: {}", e["reason"].as_str().unwrap_or("?"));
    }
    let outs = &m["outputs"];
    if let Some(d) = outs["detections"].as_array() {
        let best = d
            .iter()
            .filter_map(|d| d["score"].as_f64())
            .fold(0.0, f64::max);
        return match d.len() {
            0 => "no face".into(),
            n => format!("{n} face(s), best score {best:.3}"),
        };
    }
    let first = &outs[0];
    if let Some(top) = first["top"].get(0).or_else(|| first["top5"].get(0)) {
        let label = top["label"]
            .as_str()
            .map_or_else(|| top["index"].to_string(), String::from);
        return format!("{label} ({:.3})", top["value"].as_f64().unwrap_or(f64::NAN));
    }
    format!(
        "{} {} in [{:.3}, {:.3}]",
        first["name"].as_str().unwrap_or("?"),
        first["shape"],
        first["min"].as_f64().unwrap_or(f64::NAN),
        first["max"].as_f64().unwrap_or(f64::NAN)
    )
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
