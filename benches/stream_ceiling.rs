//! The ceiling a stream of frames is measured against: the simplest in-process loop with
//! every layer of every model planned once and kept, one frame after another on one
//! thread — decode, preprocess as each manifest says, run each model's layers in order.
//! `benches/stream.py` runs it beside the daemon on the same packages and frames.
//!
//!   cargo bench --bench stream_ceiling -- --frames N PKG... -- FRAME...
//!
//! Prints one JSON line: frames, seconds, frames/s, and the median per-frame inference
//! and decode times (ms).

use memaflow::model::Package;
use memaflow::runtime::{load_layer, run_layers_preloaded};
use memaflow::spool::preprocess;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let (head, frames) = (&args[..split], &args[(split + 1).min(args.len())..]);
    anyhow::ensure!(
        head.len() >= 3 && head[0] == "--frames" && !frames.is_empty(),
        "usage: stream_ceiling --frames N PKG... -- FRAME..."
    );
    let count: usize = head[1].parse()?;
    let packages = head[2..]
        .iter()
        .map(Package::open)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let layers = packages
        .iter()
        .map(|p| {
            (0..p.manifest.layers.len())
                .map(|i| load_layer(p, i))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut decode_ms = vec![];
    let mut infer_ms = vec![];
    let t0 = Instant::now();
    for k in 0..count {
        let t = Instant::now();
        let img = preprocess::decode_file(frames[k % frames.len()].as_ref())?;
        decode_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        for (pkg, layers) in packages.iter().zip(&layers) {
            let input = preprocess::to_input(
                &img,
                &pkg.manifest.preprocess,
                &pkg.manifest.inputs[0].shape,
            )?;
            run_layers_preloaded(pkg, layers, &input)?;
        }
        infer_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let secs = t0.elapsed().as_secs_f64();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{{\"frames\": {count}, \"secs\": {secs:.4}, \"fps\": {:.3}, \"infer_ms_median\": {:.3}, \"decode_ms_median\": {:.3}}}",
        count as f64 / secs,
        median(infer_ms),
        median(decode_ms)
    );
    Ok(())
}
