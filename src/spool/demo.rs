//! `memaflow demo`: the embedded default. Generates a small model set (zoo networks, plus
//! the shared real models when `../shared/models` is beside the checkout) and sample frames,
//! then runs every frame through every model layer by layer and prints what came out.

use super::{preprocess, results};
use crate::memory::{Bytes, process_memory};
use crate::model::{self, Package, zoo};
use crate::runtime;
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

pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join("memaflow-demo")
}

pub fn run(dir: &Path) -> Result<()> {
    let models = prepare_models(dir)?;
    let frames = prepare_frames(dir)?;
    println!(
        "demo: {} models × {} frames, layer by layer (files in {})",
        models.len(),
        frames.len(),
        dir.display()
    );
    for frame in &frames {
        let img = match preprocess::decode_file(frame) {
            Ok(img) => img,
            Err(e) => {
                println!("{}: skipped: {e:#}", frame.display());
                continue;
            }
        };
        for pkg in &models {
            let input = preprocess::to_input(
                &img,
                &pkg.manifest.preprocess,
                &pkg.manifest.inputs[0].shape,
            )?;
            let run = runtime::run_layerwise(pkg, &input)?;
            let spec = &pkg.manifest.outputs[0];
            let s = results::summarise(&spec.name, &run.outputs[0], spec.labels.as_deref());
            let verdict = match s.top5.first() {
                Some(top) => format!(
                    "{} ({:.3})",
                    top.label.clone().unwrap_or_else(|| top.index.to_string()),
                    top.value
                ),
                None => format!("{} {:?} in [{:.3}, {:.3}]", s.name, s.shape, s.min, s.max),
            };
            println!(
                "{:<16} {:<28} {:<40} {:>3} layers {:>7.1} ms",
                frame
                    .file_name()
                    .map(|f| f.to_string_lossy().to_string())
                    .unwrap_or_default(),
                pkg.name(),
                verdict,
                pkg.manifest.layers.len(),
                (run.stats.load + run.stats.exec).as_secs_f64() * 1e3
            );
        }
    }
    let total_weights: u64 = models.iter().map(|p| p.manifest.weight_bytes()).sum();
    let peak = process_memory()
        .map(|m| Bytes(m.peak_rss).to_string())
        .unwrap_or_else(|_| "?".into());
    println!(
        "demo: done; {} of weights in all, process peak RSS {peak}",
        Bytes(total_weights)
    );
    Ok(())
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
