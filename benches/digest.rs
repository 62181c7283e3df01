//! Cost of the layer digests: per model, the time to SHA-256 every layer file and to XXH3-128
//! it (what reads after a layer's first compare), against the time to load every layer
//! (read, check with XXH3 — the first, untimed pass checked SHA-256 — and plan in tract),
//! which is what a reload of the whole model pays. Run with `cargo bench --bench digest`
//! (results go in docs/model-packages.md, "Integrity").
//!
//! Per model, one untimed warm-up, then RUNS timed rounds, the modes interleaved; medians.

use memaflow::model::package::Sha256;
use memaflow::model::{ImportOptions, Package, import, zoo};
use memaflow::runtime::load_layer;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const RUNS: usize = 11;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = root.join("target/bench-digest");
    std::fs::create_dir_all(&work)?;
    let mut packages = vec![];
    for name in ["agenet", "sos_googlenet"] {
        let dir = work.join(name);
        if Package::open(&dir).is_err() {
            zoo::entry(name)?.write(&dir, true)?;
        }
        packages.push(dir);
    }
    for name in [
        "face_detection_short_range",
        "face_landmark_f32",
        "hand_recrop",
    ] {
        let dir = work.join(name);
        let model = root.join(format!("../shared/models/{name}.tflite"));
        let options = ImportOptions {
            replace: true,
            ..Default::default()
        };
        import(&model, &dir, &options)?;
        packages.push(dir);
    }
    println!(
        "| model | layers | files MiB | SHA-256 ms | MiB/s | XXH3-128 ms | MiB/s | load all layers ms | SHA-256 share if every load hashed |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for dir in &packages {
        let pkg = Package::open(dir)?;
        let n = pkg.manifest.layers.len();
        let files = (0..n)
            .map(|i| std::fs::read(pkg.layer_path(i)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let (mut hash, mut fast, mut load) = (vec![], vec![], vec![]);
        for run in 0..=RUNS {
            let t = Instant::now();
            for f in &files {
                std::hint::black_box(Sha256::of(f));
            }
            let a = t.elapsed();
            let t = Instant::now();
            for f in &files {
                std::hint::black_box(xxhash_rust::xxh3::xxh3_128(f));
            }
            let x = t.elapsed();
            let t = Instant::now();
            for i in 0..n {
                std::hint::black_box(load_layer(&pkg, i)?);
            }
            let b = t.elapsed();
            if run > 0 {
                hash.push(a);
                fast.push(x);
                load.push(b);
            }
        }
        let mib = pkg.manifest.file_bytes() as f64 / 1048576.0;
        let (h, x, l) = (median(hash), median(fast), median(load));
        println!(
            "| {} | {n} | {mib:.1} | {h:.2} | {:.0} | {x:.2} | {:.0} | {l:.2} | {:.1} % |",
            pkg.name(),
            mib / (h / 1e3),
            mib / (x / 1e3),
            100.0 * h / (l - x + h)
        );
    }
    Ok(())
}
