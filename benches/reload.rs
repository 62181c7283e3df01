//! Where a layer's load goes, per model: reading and checking the file, tract's TFLite
//! parse, declutter, codegen (kernel choice and weight packing) and plan building, summed
//! over the model's layers; beside it the time to run every layer preloaded.
//!
//!   cargo bench --bench reload -- PKG...
//!
//! Per package, one untimed pass and then RUNS passes; medians per phase (ms per frame,
//! i.e. all layers once). Results go in docs/model-packages.md.

use memaflow::model::Package;
use memaflow::runtime::run_layers_preloaded;
use memaflow::runtime::{
    FloatTensor, LoadPhases, load_layer, load_layer_timed, load_with_template, reload,
};
use std::time::{Duration, Instant};

const RUNS: usize = 9;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    println!(
        "| model | layers | weights MiB | read+check | parse | declutter | codegen | plan | load total | layers preloaded |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut reload_rows = vec![];
    for dir in std::env::args().skip(1).filter(|a| a != "--bench") {
        let pkg = Package::open(&dir)?;
        let n = pkg.manifest.layers.len();
        let input = FloatTensor::filled(pkg.manifest.inputs[0].shape.clone(), 0.5);
        let layers = (0..n)
            .map(|i| load_layer(&pkg, i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut templates = vec![];
        let mut first = LoadPhases::default();
        let t = Instant::now();
        for i in 0..n {
            let (_, template) = load_with_template(&pkg, i, &mut first)?;
            match template {
                Ok(t) => templates.push(Some(t)),
                Err(e) => {
                    eprintln!("{}: layer {i}: no template: {e:#}", pkg.name());
                    templates.push(None)
                }
            }
        }
        let first_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut runs: Vec<LoadPhases> = vec![];
        let mut reloads: Vec<LoadPhases> = vec![];
        let mut exec = vec![];
        for run in 0..=RUNS {
            let mut phases = LoadPhases::default();
            for i in 0..n {
                drop(load_layer_timed(&pkg, i, &mut phases)?);
            }
            let mut again = LoadPhases::default();
            for (i, template) in templates.iter().enumerate() {
                match template {
                    Some(t) => drop(reload(&pkg, i, t, &mut again)?),
                    None => drop(load_layer_timed(&pkg, i, &mut again)?),
                }
            }
            let t = Instant::now();
            run_layers_preloaded(&pkg, &layers, &input)?;
            if run > 0 {
                exec.push(t.elapsed());
                runs.push(phases);
                reloads.push(again);
            }
        }
        let phase = |f: fn(&LoadPhases) -> Duration| median(runs.iter().map(f).collect());
        let templated = templates.iter().filter(|t| t.is_some()).count();
        let recipes: u64 = templates.iter().flatten().map(|t| t.recipe_bytes()).sum();
        let reload_ms = median(reloads.iter().map(|p| p.total()).collect());
        reload_rows.push(format!(
            "| {} | {templated}/{n} | {:.1} | {first_ms:.2} | {:.2} | {:.2} | {:.2} | {reload_ms:.2} | {:.2} | {:.2} |",
            pkg.name(),
            recipes as f64 / 1024.0,
            median(reloads.iter().map(|p| p.read).collect()),
            median(reloads.iter().map(|p| p.optimize).collect()),
            median(reloads.iter().map(|p| p.plan).collect()),
            phase(|p| p.total()),
            median(exec.clone()),
        ));
        println!(
            "| {} | {n} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            pkg.name(),
            pkg.manifest.weight_bytes() as f64 / 1048576.0,
            phase(|p| p.read),
            phase(|p| p.parse),
            phase(|p| p.declutter),
            phase(|p| p.optimize),
            phase(|p| p.plan),
            phase(|p| p.total()),
            median(exec),
        );
    }
    println!();
    println!(
        "| model | layers with a template | recipes KiB | first load (both plans) | reload: read+check | gather | plan | reload total | full load | layers preloaded |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in reload_rows {
        println!("{row}");
    }
    Ok(())
}
