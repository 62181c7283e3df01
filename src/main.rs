//! The `memaflow` command: parses arguments, runs one mode, maps the result to an exit code.
//! Exit status: 0 on success, 2 on any error (bad input, bad usage, failed run).

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use memaflow::memory::{self, Bytes};
use memaflow::model::{self, ColorOrder, Package, Preprocess, ResizeMode, zoo};
use memaflow::runtime::{self, FloatTensor, npy};
use memaflow::spool::{self, demo, preprocess, results};
use memaflow::tiling;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "memaflow",
    version,
    about = "Runs several neural networks on every camera frame, layer by layer, in memory smaller than the models."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Import a float TFLite model as a model package (manifest + one file per layer).
    Import(ImportArgs),
    /// Run one input through a package and print a JSON summary of the outputs.
    Infer(InferArgs),
    /// Run many inferences at once (every input through every model) layer by layer,
    /// under a loading policy and a scheduler, within a memory budget.
    Batch(BatchArgs),
    /// Measure per-layer load and exec time and memory of packages, for `batch --profile`.
    Profile {
        /// Package directories.
        #[arg(required = true, value_name = "PKG")]
        packages: Vec<PathBuf>,
        /// Runs per package; medians are kept.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Profile file to write (JSON); packages already in it are replaced.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Show a package's layers: kind, weights, activations, FLOPs.
    Inspect {
        /// Package directory.
        package: PathBuf,
        /// Print the manifest as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Generate the benchmark networks (AgeNet, GenderNet, FaceNet, SoS, SoS_GoogleNet,
    /// YOLOv2's first 16 layers) as packages with deterministic weights.
    Zoo {
        /// Directory to write one package per network into.
        #[arg(long)]
        out: PathBuf,
        /// Only these networks (repeatable).
        #[arg(long, value_name = "NAME")]
        only: Vec<String>,
        /// Replace packages that already exist.
        #[arg(long)]
        force: bool,
        /// List the networks and exit.
        #[arg(long)]
        list: bool,
    },
    /// The spool daemon: runs the configured models on every frame that arrives in the
    /// spool's incoming/ directory and writes one JSON result per frame (docs/spool.md).
    Run(RunArgs),
    /// Send every result in the spool's out/ to the MQTT broker of the configuration's
    /// [publish] section, at least once, oldest first (docs/publish.md).
    #[cfg(feature = "publish")]
    Publish {
        /// Configuration file (TOML): the daemon's, with a [publish] section.
        #[arg(long, value_name = "FILE", default_value = spool::config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Run an experiment plan: every run a `memaflow batch` child in a memory cgroup with
    /// the run's limit; writes runs.csv, table.md (speed-ups vs bulk+fcfs) and SVG plots.
    #[cfg(feature = "bench")]
    Bench(BenchArgs),
    /// Fused tiling of the early conv layers: search and predictions.
    #[command(subcommand)]
    Tile(TileCommand),
    /// Run the built-in demonstration: generated models on sample frames.
    Demo {
        /// Working directory for generated models and frames (kept between runs).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TileCommand {
    /// Print the fastest tiling configuration predicted to fit the budget, with its
    /// predicted peak memory and latency.
    Plan {
        /// Package directory.
        package: PathBuf,
        /// Memory budget for the inference (e.g. 16M).
        #[arg(long, value_name = "SIZE")]
        budget: Bytes,
        /// Most groups of layers tiled.
        #[arg(long, default_value_t = 2)]
        max_groups: usize,
        /// Largest grid side (grids up to N×N).
        #[arg(long, default_value_t = 8, value_name = "N")]
        max_grid: usize,
        /// Most output-channel slices of a layer outside the groups (1: never slice).
        #[arg(long, default_value_t = 4, value_name = "N")]
        max_slices: usize,
    },
    /// Print the predicted peak memory and latency of configurations, one JSON line each.
    Predict {
        /// Package directory.
        package: PathBuf,
        /// `off`, or groups FIRST-LAST:ROWSxCOLS and sliced layers LAYER/SLICES separated
        /// by commas.
        #[arg(required = true, value_name = "CONFIG")]
        configs: Vec<tiling::Config>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, value_name = "FILE", default_value = spool::config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Board defaults to use (pi-zero-2w, pi3b, pi4-2g, pi4-4g, pi5, qemu-virt, or a
    /// board file); default: the config's `board`, else detected from the device tree.
    #[arg(long, value_name = "NAME")]
    board: Option<String>,
    /// Process what is in the spool (and what arrives meanwhile), then exit.
    #[arg(long)]
    once: bool,
}

#[derive(clap::Args)]
struct ImportArgs {
    /// The .tflite file.
    model: PathBuf,
    /// Package directory to create.
    #[arg(long)]
    out: PathBuf,
    /// Package name (default: the file name without extension).
    #[arg(long)]
    name: Option<String>,
    /// Replace an existing package at --out.
    #[arg(long)]
    force: bool,
    /// Split fully-connected layers with more weights than this into several layers, so
    /// that each fits a small budget (0: never split).
    #[arg(long, value_name = "SIZE", default_value = "16M")]
    max_layer_weights: Bytes,
    /// Map pixels 0..255 linearly onto LO,HI (default 0,1). Exclusive with --mean/--std.
    #[arg(long, value_name = "LO,HI", conflicts_with_all = ["mean", "std"], allow_hyphen_values = true)]
    range: Option<String>,
    /// Per-channel mean subtracted from 0..255 pixels, e.g. 127.5 or 104,117,123.
    #[arg(long, value_name = "M[,M,M]", requires = "std")]
    mean: Option<String>,
    /// Per-channel divisor applied after the mean, e.g. 127.5 or 58.4,57.1,57.4.
    #[arg(long, value_name = "S[,S,S]", requires = "mean")]
    std: Option<String>,
    /// Channel order the model expects.
    #[arg(long, value_enum, default_value = "rgb")]
    color: ColorArg,
    /// How frames are fitted to the input size.
    #[arg(long, value_enum, default_value = "stretch")]
    resize: ResizeArg,
    /// Text file with one class label per line, for the output with that many values.
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ColorArg {
    Rgb,
    Bgr,
    Gray,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ResizeArg {
    Stretch,
    Crop,
    Letterbox,
}

#[derive(clap::Args)]
struct BatchArgs {
    /// Package directories (comma-separated or repeated).
    #[arg(long, required = true, value_delimiter = ',', value_name = "PKG")]
    models: Vec<PathBuf>,
    /// Images to run through every model (JPEG, PNG, PPM/PGM, BMP).
    #[arg(long, num_args = 1.., value_name = "IMAGE", required_unless_present = "input_npy", conflicts_with = "input_npy")]
    images: Vec<PathBuf>,
    /// Float tensors to feed every model as is.
    #[arg(long, num_args = 1.., value_name = "FILE")]
    input_npy: Vec<PathBuf>,
    /// How layers are loaded relative to their execution.
    #[arg(long, value_enum, default_value = "partial")]
    loading: runtime::LoadingPolicy,
    /// Which ready task runs next.
    #[arg(long, value_enum, default_value = "mema")]
    scheduling: runtime::SchedulingPolicy,
    /// Inferences in flight at once (1 to 16).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=runtime::MAX_PARALLEL as i64))]
    parallel: u16,
    /// Memory budget for weights and activations (e.g. 256M, 1G); the live MemAvailable
    /// and cgroup limit bound it further.
    #[arg(long, value_name = "SIZE")]
    budget: Option<Bytes>,
    /// Memory kept free below MemAvailable and the cgroup limit.
    #[arg(long, value_name = "SIZE", default_value = "16M")]
    reserve: Bytes,
    /// Fused tiling: `needed` runs a model tiled when one of its layers does not fit the
    /// budget (`--budget`, else the memory free at the start) on its own; `auto` whenever
    /// the search predicts a faster tiled run within it; `off` never.
    #[arg(long, value_enum, default_value = "needed")]
    tiling: tiling::Mode,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// `keep`: a loaded layer stays resident for the next inference of its model while
    /// memory allows; `off`: every inference loads its own layers (the paper's runs).
    #[arg(long, value_enum, default_value = "keep")]
    cache: runtime::LayerCache,
    /// Which resident layer makes room first when a load needs it.
    #[arg(long, value_enum, default_value = "furthest-ahead")]
    eviction: runtime::Eviction,
    /// Per-layer costs measured by `memaflow profile` (estimated from the manifest for
    /// packages it does not cover).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Write outputs as DIR/KK-MODEL/NN.npy (KK: inference number) with outputs.json.
    #[arg(long, value_name = "DIR")]
    npy_out: Option<PathBuf>,
    /// Write the full report (timeline of every task, budget readings) as JSON.
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,
    /// The status quo instead: each model run whole in tract, one inference after another
    /// (no layers, no scheduler, no budget).
    #[arg(long, conflicts_with_all = ["loading", "scheduling", "parallel", "budget", "workers", "profile", "tiling", "cache", "eviction"])]
    status_quo: bool,
}

#[cfg(feature = "bench")]
#[derive(clap::Args)]
struct BenchArgs {
    /// The experiment plan (TOML; see docs/bench.md and benches/*.toml).
    #[arg(long, value_name = "FILE.toml", required_unless_present = "replot")]
    plan: Option<PathBuf>,
    /// Directory for runs.csv, table.md, the SVG plots and per-run logs of failed runs.
    #[arg(long, value_name = "DIR", required_unless_present_any = ["dry_run", "replot"])]
    out: Option<PathBuf>,
    /// Rewrite table.md and the plots of a bench's output DIR from its runs.csv and
    /// plan.toml, running nothing.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["plan", "out", "dry_run", "workloads"])]
    replot: Option<PathBuf>,
    /// Print how many runs the plan expands to, and run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Model packages by name (DIR/NAME); zoo networks missing there are generated into
    /// it. Default: OUT/models.
    #[arg(long, value_name = "DIR")]
    models: Option<PathBuf>,
    /// Frames to run (sorted by name, reused in turn). Default: deterministic 500×500
    /// frames generated into OUT/frames.
    #[arg(long, value_name = "DIR")]
    frames: Option<PathBuf>,
    /// Directory to create the run cgroups in. Default: memaflow-bench inside this
    /// process's memory cgroup.
    #[arg(long, value_name = "DIR", conflicts_with = "no_cgroup")]
    cgroup_parent: Option<PathBuf>,
    /// Do not use cgroups: pass each memory level as --budget (rows marked budget-only).
    #[arg(long)]
    no_cgroup: bool,
    /// Run only this workload of the plan (repeat for several); with --dry-run, count
    /// only its runs.
    #[arg(long = "workload", value_name = "NAME")]
    workloads: Vec<String>,
}

#[derive(clap::Args)]
struct InferArgs {
    /// Package directory.
    #[arg(long)]
    model: PathBuf,
    /// Image to run (JPEG, PNG, PPM/PGM, BMP), preprocessed as the manifest says.
    #[arg(required_unless_present = "input_npy", conflicts_with = "input_npy")]
    image: Option<PathBuf>,
    /// Feed this float tensor as the input, as is (no preprocessing).
    #[arg(long, value_name = "FILE")]
    input_npy: Option<PathBuf>,
    /// Run the whole normalised model in tract instead of layer by layer.
    #[arg(long)]
    whole: bool,
    /// Write each output as DIR/NN.npy (NN = position in the model's outputs) and
    /// DIR/outputs.json with their names.
    #[arg(long, value_name = "DIR")]
    npy_out: Option<PathBuf>,
    /// Also write the preprocessed input tensor to this .npy file.
    #[arg(long, value_name = "FILE")]
    save_input: Option<PathBuf>,
    /// Fused tiling of the early conv layers: `off`, `auto` (the fastest configuration
    /// predicted to fit --budget), or groups FIRST-LAST:ROWSxCOLS of layer indices and
    /// layers in output-channel slices LAYER/SLICES, e.g. `0-2:4x4,3-5:2x2,8/3`. Unset:
    /// `auto` when --budget is given and the untiled run is predicted not to fit it,
    /// otherwise off.
    #[arg(long, value_name = "MODE", conflicts_with = "whole")]
    tiling: Option<tiling::Tiling>,
    /// Memory budget for the inference's activations and weights, for tiling.
    #[arg(long, value_name = "SIZE", conflicts_with = "whole")]
    budget: Option<Bytes>,
}

fn main() {
    // Output piped into `head` must end the program quietly, as it does for other Unix
    // tools, not make `println!` panic.
    // SAFETY: restoring the default disposition of SIGPIPE installs no handler (so no
    // async-signal-safety concern), and runs before any thread exists.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    memaflow::memory::return_freed_memory_promptly();
    let cli = Cli::parse();
    // The daemon lowers the level to its configuration's `log_level` when RUST_LOG is unset.
    // tract_linalg logs its CPU detection on aarch64 at info and warn ("Could not find
    // Features" under QEMU user mode): noise before every command's output, and under
    // emulation it describes the host, so only its errors pass by default.
    let default_level = match cli.command {
        Command::Run(_) => "trace,tract_linalg=error",
        // rumqttc logs every reconnection attempt; the publisher says what matters itself.
        #[cfg(feature = "publish")]
        Command::Publish { .. } => "trace,tract_linalg=error,rumqttc=warn",
        _ => "info,tract_linalg=error",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .format_timestamp(None)
        .init();
    let result = match cli.command {
        Command::Import(args) => import(args),
        Command::Infer(args) => infer(args),
        Command::Batch(args) => batch(args),
        Command::Profile {
            packages,
            runs,
            out,
        } => profile(&packages, runs, &out),
        Command::Inspect { package, json } => inspect(&package, json),
        Command::Zoo {
            out,
            only,
            force,
            list,
        } => zoo_cmd(&out, &only, force, list),
        Command::Run(args) => spool::daemon::run(&spool::daemon::RunOptions {
            config: args.config,
            board: args.board,
            once: args.once,
        }),
        #[cfg(feature = "publish")]
        Command::Publish { config } => memaflow::publish::run(&config),
        #[cfg(feature = "bench")]
        Command::Bench(args) => bench(args),
        Command::Tile(command) => tile(command),
        Command::Demo { dir } => demo::run(&dir.unwrap_or_else(demo::default_dir)),
    };
    if let Err(e) = result {
        eprintln!("memaflow: error: {e:#}");
        std::process::exit(2);
    }
}

fn floats(text: &str, what: &str) -> Result<Vec<f32>> {
    text.split(',')
        .map(|v| {
            v.trim()
                .parse::<f32>()
                .with_context(|| format!("{what}: '{v}' is not a number"))
        })
        .collect()
}

fn import(a: ImportArgs) -> Result<()> {
    let mut preprocess = Preprocess {
        color: match a.color {
            ColorArg::Rgb => ColorOrder::Rgb,
            ColorArg::Bgr => ColorOrder::Bgr,
            ColorArg::Gray => ColorOrder::Gray,
        },
        resize: match a.resize {
            ResizeArg::Stretch => ResizeMode::Stretch,
            ResizeArg::Crop => ResizeMode::Crop,
            ResizeArg::Letterbox => ResizeMode::Letterbox,
        },
        ..Preprocess::default()
    };
    if let Some(range) = &a.range {
        let r = floats(range, "--range")?;
        if r.len() != 2 || r[0] == r[1] {
            bail!("--range takes two different numbers, LO,HI");
        }
        // pixel/255·(hi-lo) + lo  ==  (pixel - mean) / std
        let std = 255.0 / (r[1] - r[0]);
        preprocess.mean = vec![-r[0] * std];
        preprocess.std = vec![std];
    }
    if let (Some(m), Some(s)) = (&a.mean, &a.std) {
        preprocess.mean = floats(m, "--mean")?;
        preprocess.std = floats(s, "--std")?;
    }
    let labels = a
        .labels
        .as_deref()
        .map(model::package::read_labels)
        .transpose()?;
    let options = model::ImportOptions {
        name: a.name,
        preprocess,
        labels,
        replace: a.force,
        max_layer_weights: (a.max_layer_weights.0 > 0).then_some(a.max_layer_weights.0),
    };
    let t = Instant::now();
    let m = model::import(&a.model, &a.out, &options)?;
    let rewrites: Vec<String> = m
        .normalisation
        .iter()
        .map(|(k, v)| format!("{k}×{v}"))
        .collect();
    let peak = memory::process_memory()
        .map(|m| format!(", peak RSS {:.1} MiB", m.peak_rss as f64 / 1048576.0))
        .unwrap_or_default();
    println!(
        "{}: {} layers, {} of weights, {} of layer files, written to {} in {:.1} s{peak}{}",
        m.name,
        m.layers.len(),
        Bytes(m.weight_bytes()),
        Bytes(m.file_bytes()),
        a.out.display(),
        t.elapsed().as_secs_f64(),
        if rewrites.is_empty() {
            String::new()
        } else {
            format!(" (normalised: {})", rewrites.join(", "))
        }
    );
    Ok(())
}

fn infer(a: InferArgs) -> Result<()> {
    let pkg = Package::open(&a.model)?;
    let input = input_for(&pkg, a.image.as_deref(), a.input_npy.as_deref())?;
    let source = a
        .input_npy
        .as_ref()
        .or(a.image.as_ref())
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if let Some(path) = &a.save_input {
        npy::write(path, &input.shape, &input.data)?;
    }
    // An explicit `--tiling off` runs the tiled executor without groups, so that it
    // differs from a tiled run by the tiling alone (benchmarks compare the two).
    let config = match (&a.tiling, a.budget) {
        _ if a.whole => None,
        (None, None) => None,
        (Some(tiling::Tiling::Off), _) => Some(tiling::Config::untiled()),
        (Some(tiling::Tiling::Fixed(c)), _) => Some(c.clone()),
        (Some(tiling::Tiling::Auto), budget) | (None, budget @ Some(_)) => {
            let auto = a.tiling.is_some();
            tiling::search::for_inference(&pkg, budget.map(|b| b.0), auto)?
        }
    };
    // The run's own peak: VmHWM restarts from the current resident set here.
    let before = memory::process_memory().ok();
    let reset = memory::reset_peak().is_ok();
    let t = Instant::now();
    let (run, tiled) = match &config {
        _ if a.whole => (runtime::run_whole(&pkg, &input)?, None),
        None => (runtime::run_layerwise(&pkg, &input)?, None),
        Some(config) => {
            let run = tiling::run_tiled(&pkg, input, config)?;
            let stats = run.stats;
            let result = runtime::RunResult {
                outputs: run.outputs,
                stats: stats.run,
            };
            (result, Some((config, stats)))
        }
    };
    let total = t.elapsed();
    let after = memory::process_memory().ok();
    if let Some(dir) = &a.npy_out {
        write_npy_outputs(dir, &pkg, &run.outputs)?;
    }
    let outputs: Vec<results::OutputSummary> = pkg
        .manifest
        .outputs
        .iter()
        .zip(&run.outputs)
        .map(|(spec, t)| results::summarise(&spec.name, t, spec.labels.as_deref()))
        .collect();
    let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    let summary = serde_json::json!({
        "model": pkg.name(),
        "mode": if a.whole { "whole" } else if tiled.is_some_and(|(c, _)| !c.is_untiled()) { "tiled" } else { "layers" },
        "layers": pkg.manifest.layers.len(),
        "input": source,
        "outputs": outputs,
        "time_ms": { "load": ms(run.stats.load), "exec": ms(run.stats.exec), "total": ms(total) },
        "peak_rss_bytes": after.map(|m| m.peak_rss.max(before.map_or(0, |b| b.peak_rss))),
        "run_peak_delta_bytes": match (before, after) {
            (Some(b), Some(a)) if reset => Some(a.peak_rss.saturating_sub(b.rss)),
            _ => None,
        },
        "tiling": tiled.map(|(config, stats)| serde_json::json!({
            "config": config.to_string(),
            "tiles": stats.tiles,
            "plans": stats.plans,
        })),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// `DIR/NN.npy` per output (NN: its position in the model's outputs) and `DIR/outputs.json`.
fn write_npy_outputs(dir: &Path, pkg: &Package, outputs: &[FloatTensor]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let width = pkg.manifest.outputs.len().to_string().len().max(2);
    for (i, out) in outputs.iter().enumerate() {
        npy::write(&dir.join(format!("{i:0width$}.npy")), &out.shape, &out.data)?;
    }
    let names: Vec<&str> = pkg
        .manifest
        .outputs
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    std::fs::write(
        dir.join("outputs.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "outputs": names }))?,
    )?;
    Ok(())
}

/// The input tensor for `pkg` from an image (preprocessed per its manifest) or a .npy.
fn input_for(pkg: &Package, image: Option<&Path>, npy_file: Option<&Path>) -> Result<FloatTensor> {
    match (image, npy_file) {
        (_, Some(path)) => Ok(FloatTensor::from(npy::read(path)?)),
        (Some(path), None) => {
            let img = preprocess::decode_file(path)?;
            preprocess::to_input(
                &img,
                &pkg.manifest.preprocess,
                &pkg.manifest.inputs[0].shape,
            )
            .with_context(|| pkg.name().to_string())
        }
        (None, None) => bail!("give an IMAGE or --input-npy FILE"),
    }
}

fn batch(a: BatchArgs) -> Result<()> {
    let packages = a
        .models
        .iter()
        .map(|m| Package::open(m).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    let sources: Vec<(Option<&Path>, Option<&Path>, String)> = if a.input_npy.is_empty() {
        a.images
            .iter()
            .map(|p| (Some(p.as_path()), None, p.display().to_string()))
            .collect()
    } else {
        a.input_npy
            .iter()
            .map(|p| (None, Some(p.as_path()), p.display().to_string()))
            .collect()
    };
    let profile = match &a.profile {
        Some(path) => memaflow::profile::Profile::read(path)?,
        None => memaflow::profile::Profile::default(),
    };
    // One cost table per package, shared by its inferences, so that timings observed on
    // one input refine the schedule of the next.
    let costs: Vec<Arc<[runtime::LayerCost]>> = packages
        .iter()
        .map(|p| profile.costs_for(p).into())
        .collect();
    let system = memory::SystemMemory::detect();
    let tiled = if a.status_quo {
        vec![None; packages.len()]
    } else {
        let budget = a
            .budget
            .map(|b| b.0)
            .or_else(|| system.read().ok().and_then(|r| r.headroom(a.reserve.0)));
        packages
            .iter()
            .zip(&costs)
            .map(|(p, c)| tiling::TiledModel::plan(p, c, a.tiling, budget))
            .collect::<Result<Vec<_>>>()?
    };
    let mut jobs = vec![];
    let mut labels = vec![];
    for (image, npy_file, name) in &sources {
        for ((pkg, costs), tiled) in packages.iter().zip(&costs).zip(&tiled) {
            let input = input_for(pkg, *image, *npy_file).with_context(|| name.clone())?;
            jobs.push(match tiled {
                Some(t) => t.job(input),
                None => runtime::Job::layered(pkg.clone(), input, costs.clone()),
            });
            labels.push(name.clone());
        }
    }
    if a.status_quo {
        return batch_status_quo(&jobs, &labels, a.npy_out.as_deref(), a.report.as_deref());
    }
    let workers = a
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let options = runtime::BatchOptions {
        loading: a.loading,
        scheduling: a.scheduling,
        parallel: a.parallel.into(),
        budget: a.budget.map(|b| b.0),
        reserve: a.reserve.0,
        workers,
        cache: a.cache,
        eviction: a.eviction,
    };
    let report = runtime::run_batch(jobs.clone(), &options, &system)?;
    if let Some(dir) = &a.npy_out {
        write_batch_outputs(dir, &jobs, &report.outputs)?;
    }
    if let Some(path) = &a.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let spans = report.inferences.iter().map(|r| (r.start_ms, r.end_ms));
    let inferences = inference_summaries(&jobs, &report.outputs, &labels, spans);
    let summary = serde_json::json!({
        "loading": report.loading,
        "scheduling": report.scheduling,
        "parallel": report.parallel,
        "budget_bytes": report.budget,
        "makespan_ms": report.makespan_ms,
        "ledger_high_water_bytes": report.ledger_high_water,
        "overdrafts": report.overdrafts,
        "cache": report.cache,
        "layers": report.cache_stats,
        "peak_rss_bytes": report.peak_rss,
        "tiled": packages
            .iter()
            .zip(&tiled)
            .filter_map(|(p, t)| Some((p.name().to_string(), t.as_ref()?.config.to_string().into())))
            .collect::<serde_json::Map<_, _>>(),
        "inferences": inferences,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// `--npy-out DIR` of a batch: `DIR/KK-MODEL/NN.npy` per job, in submission order.
fn write_batch_outputs(
    dir: &Path,
    jobs: &[runtime::Job],
    outputs: &[Vec<runtime::FloatTensor>],
) -> Result<()> {
    let width = jobs.len().to_string().len().max(2);
    for (k, (job, outs)) in jobs.iter().zip(outputs).enumerate() {
        write_npy_outputs(
            &dir.join(format!("{k:0width$}-{}", job.package.name())),
            &job.package,
            outs,
        )?;
    }
    Ok(())
}

/// The per-inference part of a batch's printed summary: model, input, start/end (ms) and
/// every output summarised as `infer` prints it.
fn inference_summaries(
    jobs: &[runtime::Job],
    outputs: &[Vec<runtime::FloatTensor>],
    labels: &[String],
    spans: impl Iterator<Item = (f64, f64)>,
) -> Vec<serde_json::Value> {
    jobs.iter()
        .zip(outputs)
        .zip(labels)
        .zip(spans)
        .map(|(((job, outs), input), (start_ms, end_ms))| {
            let summaries: Vec<results::OutputSummary> = job
                .package
                .manifest
                .outputs
                .iter()
                .zip(outs)
                .map(|(spec, t)| results::summarise(&spec.name, t, spec.labels.as_deref()))
                .collect();
            serde_json::json!({ "model": job.package.name(), "input": input, "start_ms": start_ms, "end_ms": end_ms, "outputs": summaries })
        })
        .collect()
}

/// `batch --status-quo`: the same jobs, each whole in tract, one after another.
fn batch_status_quo(
    jobs: &[runtime::Job],
    labels: &[String],
    npy_out: Option<&Path>,
    report_path: Option<&Path>,
) -> Result<()> {
    let report = memaflow::bench::status_quo::run(jobs)?;
    if let Some(dir) = npy_out {
        write_batch_outputs(dir, jobs, &report.outputs)?;
    }
    if let Some(path) = report_path {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let spans = report.inferences.iter().map(|r| (r.start_ms, r.end_ms));
    let inferences = inference_summaries(jobs, &report.outputs, labels, spans);
    let summary = serde_json::json!({
        "mode": report.mode,
        "makespan_ms": report.makespan_ms,
        "peak_rss_bytes": report.peak_rss,
        "inferences": inferences,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

#[cfg(feature = "bench")]
fn bench(a: BenchArgs) -> Result<()> {
    let (Some(plan), Some(out), false) = (a.plan.clone(), a.out, a.dry_run) else {
        if let Some(dir) = &a.replot {
            for f in memaflow::bench::replot(dir)? {
                println!("wrote {}", f.display());
            }
        } else if let Some(plan) = &a.plan {
            let plan = memaflow::bench::plan::Plan::read(plan)?.only_workloads(&a.workloads)?;
            print!("{}", plan.summary());
        }
        return Ok(());
    };
    let options = memaflow::bench::BenchOptions {
        plan,
        out,
        models: a.models,
        frames: a.frames,
        cgroup_parent: a.cgroup_parent,
        no_cgroup: a.no_cgroup,
        workloads: a.workloads,
        program: std::env::current_exe().context("locating the memaflow binary")?,
    };
    let summary = memaflow::bench::run(&options)?;
    let counts: Vec<String> = summary
        .by_status
        .iter()
        .map(|(s, n)| format!("{n} {}", s.name()))
        .collect();
    println!(
        "{} runs ({}){}",
        summary.runs,
        counts.join(", "),
        if summary.budget_only {
            "; limits NOT enforced (budget-only)"
        } else {
            ""
        }
    );
    for f in &summary.files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

fn profile(packages: &[PathBuf], runs: usize, out: &Path) -> Result<()> {
    let mut profile = if out.exists() {
        memaflow::profile::Profile::read(out)?
    } else {
        memaflow::profile::Profile::default()
    };
    for dir in packages {
        let pkg = Package::open(dir)?;
        let t = Instant::now();
        let measured = memaflow::profile::profile_package(&pkg, runs)
            .with_context(|| pkg.name().to_string())?;
        let sum =
            |f: fn(&runtime::LayerCost) -> f64| measured.costs.iter().map(f).sum::<f64>() * 1e3;
        println!(
            "{}: {} layers, load {:.1} ms, exec {:.1} ms per run (medians of {runs}), profiled in {:.1} s",
            pkg.name(),
            measured.layers,
            sum(|c| c.load_secs),
            sum(|c| c.exec_secs),
            t.elapsed().as_secs_f64()
        );
        profile.models.insert(pkg.name().to_string(), measured);
    }
    profile.write(out)
}

fn inspect(dir: &Path, json: bool) -> Result<()> {
    let pkg = Package::open(dir)?;
    let m = &pkg.manifest;
    if json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    let io = |v: Vec<(&str, &Vec<usize>)>| {
        v.iter()
            .map(|(n, s)| format!("{n} {s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "{}: {} layers; input {}; outputs {}",
        m.name,
        m.layers.len(),
        io(m.inputs
            .iter()
            .map(|t| (t.name.as_str(), &t.shape))
            .collect()),
        io(m.outputs
            .iter()
            .map(|t| (t.name.as_str(), &t.shape))
            .collect())
    );
    println!(
        "{:>5}  {:<6} {:>11} {:>11} {:>11} {:>10}  ops",
        "layer", "kind", "weights", "act in", "act out", "MFLOPs"
    );
    for l in &m.layers {
        println!(
            "{:>5}  {:<6} {:>11} {:>11} {:>11} {:>10.1}  {}",
            l.index,
            l.kind.name(),
            Bytes(l.weight_bytes).to_string(),
            Bytes(l.input_bytes()).to_string(),
            Bytes(l.output_bytes()).to_string(),
            l.flops as f64 / 1e6,
            l.ops.join("+")
        );
    }
    let peak_act = m
        .layers
        .iter()
        .map(|l| l.input_bytes() + l.output_bytes())
        .max()
        .unwrap_or(0);
    println!(
        "total  {:<6} {:>11} {:>11} {:>11} {:>10.1}  (files {}, largest layer {})",
        "",
        Bytes(m.weight_bytes()).to_string(),
        "",
        format!("max {}", Bytes(peak_act)),
        m.flops() as f64 / 1e6,
        Bytes(m.file_bytes()),
        Bytes(m.layers.iter().map(|l| l.weight_bytes).max().unwrap_or(0)),
    );
    Ok(())
}

fn tile(command: TileCommand) -> Result<()> {
    match command {
        TileCommand::Plan {
            package,
            budget,
            max_groups,
            max_grid,
            max_slices,
        } => {
            let pkg = Package::open(&package)?;
            let model = tiling::predictor::Model::new(&pkg, tiling::predictor::CALIBRATION)?;
            let space = tiling::search::Space {
                max_groups,
                max_grid,
                max_slices,
            };
            let t = Instant::now();
            let choice = tiling::search::search(&model, budget.0, space)?;
            let (e, u) = (choice.estimate, choice.untiled);
            println!(
                "{}: --tiling {}\n  predicted peak {} ({:.2}× untiled {}), latency {:.0} ms ({:.2}× untiled {:.0} ms)\n  {} plans, {} tiles, {:.2} GFLOPs; {} configurations considered in {:.1} s",
                pkg.name(),
                choice.config,
                Bytes(e.peak_bytes),
                e.peak_bytes as f64 / u.peak_bytes as f64,
                Bytes(u.peak_bytes),
                e.secs * 1e3,
                e.secs / u.secs,
                u.secs * 1e3,
                e.plans,
                e.tiles,
                e.flops as f64 / 1e9,
                choice.considered,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        TileCommand::Predict { package, configs } => {
            let pkg = Package::open(&package)?;
            let model = tiling::predictor::Model::new(&pkg, tiling::predictor::CALIBRATION)?;
            for config in configs {
                let e = model.predict(&config)?;
                println!(
                    "{}",
                    serde_json::json!({ "config": config.to_string(), "estimate": e })
                );
            }
            Ok(())
        }
    }
}

fn zoo_cmd(out: &Path, only: &[String], force: bool, list: bool) -> Result<()> {
    if list {
        for e in zoo::ZOO {
            println!("{:<14} {}", e.name, e.about);
        }
        return Ok(());
    }
    let entries: Vec<&zoo::ZooEntry> = if only.is_empty() {
        zoo::ZOO.iter().collect()
    } else {
        only.iter().map(|n| zoo::entry(n)).collect::<Result<_>>()?
    };
    for e in entries {
        let t = Instant::now();
        let m = e.write(&out.join(e.name), force)?;
        let paper = e
            .paper_mib
            .map(|p| format!(" (paper: {p} MiB)"))
            .unwrap_or_default();
        println!(
            "{:<14} {:>3} layers, weights {}{}, {:.1} s",
            e.name,
            m.layers.len(),
            Bytes(m.weight_bytes()),
            paper,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
