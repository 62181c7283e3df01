//! Cost of the layer split: per-frame time of layer-by-layer execution against the whole
//! model in tract, for the zoo networks and the shared real models, and the peak RSS of
//! import. Run with `cargo bench --bench split` (results go in docs/model-packages.md).
//!
//! Per model and mode, one untimed warm-up and then RUNS timed frames in one process;
//! medians are reported. Modes:
//! - whole: the whole normalised model, planned once, run per frame (the status quo);
//! - layers: every layer planned once and kept, run in order per frame (split overhead);
//! - layers+load: every layer read from disk, planned, run and dropped per frame (what the
//!   memory-constrained runtime pays when nothing stays resident).

use memaflow::model::{ImportOptions, Package, import, tflite, zoo};
use memaflow::runtime::{FloatTensor, Plan, load_layer, run_layers_preloaded, run_layerwise};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const RUNS: usize = 11;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn bench(pkg: &Package) -> anyhow::Result<(Duration, Duration, Duration)> {
    let input = FloatTensor::filled(pkg.manifest.inputs[0].shape.clone(), 0.5);
    let whole_graph = pkg.whole_graph()?;
    let whole = Plan::from_tflite(tflite::write_graph(&whole_graph, Default::default())?)?;
    drop(whole_graph);
    let layers = (0..pkg.manifest.layers.len())
        .map(|i| load_layer(pkg, i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut t_whole = vec![];
    let mut t_layers = vec![];
    let mut t_load = vec![];
    for run in 0..=RUNS {
        // Interleaved so that machine noise hits every mode alike.
        let t = Instant::now();
        whole.run_floats(std::slice::from_ref(&input))?;
        let a = t.elapsed();
        let t = Instant::now();
        run_layers_preloaded(pkg, &layers, &input)?;
        let b = t.elapsed();
        let t = Instant::now();
        run_layerwise(pkg, &input)?;
        let c = t.elapsed();
        if run > 0 {
            t_whole.push(a);
            t_layers.push(b);
            t_load.push(c);
        }
    }
    Ok((median(t_whole), median(t_layers), median(t_load)))
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = root.join("target/bench-split");
    std::fs::create_dir_all(&work)?;
    let mut packages = vec![];
    for entry in zoo::ZOO {
        let dir = work.join(entry.name);
        if Package::open(&dir).is_err() {
            entry.write(&dir, true)?;
        }
        packages.push(dir);
    }
    let shared = root.join("../shared/models");
    let mut imports = vec![];
    for name in [
        "face_detection_short_range",
        "face_landmark_f32",
        "hand_recrop",
    ] {
        let model = shared.join(format!("{name}.tflite"));
        let dir = work.join(name);
        import(
            &model,
            &dir,
            &ImportOptions {
                replace: true,
                ..Default::default()
            },
        )?;
        packages.push(dir);
        imports.push((name, model));
    }
    println!(
        "| model | layers | weights MiB | whole ms | layers ms | ratio | layers+load ms | ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for dir in &packages {
        let pkg = Package::open(dir)?;
        let (w, l, ll) = bench(&pkg)?;
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.2} | {:.3} | {:.2} | {:.3} |",
            pkg.name(),
            pkg.manifest.layers.len(),
            pkg.manifest.weight_bytes() as f64 / 1048576.0,
            ms(w),
            ms(l),
            ms(l) / ms(w),
            ms(ll),
            ms(ll) / ms(w)
        );
    }
    // Import peak RSS for the largest zoo network (via its own .tflite written from the
    // package) and the shared models: each in a fresh child, so the maxima are its own.
    println!();
    println!("| import of | weights MiB | peak RSS MiB | limit 2×weights+50 MiB |");
    println!("|---|---:|---:|---:|");
    let facenet = Package::open(work.join("facenet"))?;
    let facenet_file = work.join("facenet.tflite");
    std::fs::write(
        &facenet_file,
        tflite::write_graph(&facenet.whole_graph()?, Default::default())?,
    )?;
    let mut sources: Vec<(String, PathBuf, u64)> = vec![(
        "facenet".into(),
        facenet_file,
        facenet.manifest.weight_bytes(),
    )];
    for (name, model) in imports {
        let weights = Package::open(work.join(name))?.manifest.weight_bytes();
        sources.push((name.to_string(), model, weights));
    }
    for (name, model, weights) in sources {
        let rss = import_peak_rss(&model, &work.join(format!("import-{name}")))?;
        let mib = |b: u64| b as f64 / 1048576.0;
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            mib(weights),
            mib(rss),
            mib(2 * weights) + 50.0
        );
    }
    Ok(())
}

/// Peak RSS of `memaflow import` in a fresh process, as the import itself reports it
/// (VmHWM when it finishes).
fn import_peak_rss(model: &Path, out: &Path) -> anyhow::Result<u64> {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_memaflow"));
    let output = Command::new(&exe)
        .arg("import")
        .arg(model)
        .arg("--out")
        .arg(out)
        .arg("--force")
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "import of {} failed: {}",
        model.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let peak = text
        .split("peak RSS ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok());
    peak.map(|mib| (mib * 1048576.0) as u64)
        .ok_or_else(|| anyhow::anyhow!("import did not report its peak RSS: {text}"))
}
