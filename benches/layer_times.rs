//! Warm execution time of every layer of some packages in tract: each layer planned once,
//! run on its inputs from a real pass (so shapes and values are the model's own), RUNS
//! times; the median is printed per layer as one JSON line. `benches/ops_vs_litert.py`
//! sets these beside ai-edge-litert (XNNPACK) running the same layer files.
//!
//!   cargo bench --bench layer_times -- PKG...

use memaflow::model::Package;
use memaflow::runtime::{Activations, FloatTensor, load_layer};
use std::time::Instant;

const RUNS: usize = 21;

fn main() -> anyhow::Result<()> {
    for dir in std::env::args().skip(1).filter(|a| a != "--bench") {
        let pkg = Package::open(&dir)?;
        let input = FloatTensor::filled(pkg.manifest.inputs[0].shape.clone(), 0.5);
        let mut walk = Activations::new(&pkg, &input)?;
        for (i, entry) in pkg.manifest.layers.iter().enumerate() {
            let layer = load_layer(&pkg, i)?;
            let mut times = vec![];
            for _ in 0..RUNS {
                // The layer reads the walk's values and does not consume them: run it on
                // a copy of the walk each time, keep the last.
                let mut run = walk.clone();
                let t = Instant::now();
                run.step(&pkg, &layer)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            walk.step(&pkg, &layer)?;
            times.sort_by(f64::total_cmp);
            println!(
                "{}",
                serde_json::json!({
                    "model": pkg.name(),
                    "layer": i,
                    "file": pkg.layer_path(i),
                    "ops": entry.ops,
                    "tract_ms": times[RUNS / 2],
                })
            );
        }
    }
    Ok(())
}
