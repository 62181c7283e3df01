//! The `memaflow` command: parses arguments, runs one mode, maps the result to an exit code.
//! Exit status: 0 on success, 2 on any error (bad input, bad usage, failed run).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use memaflow::commands;
use memaflow::memory::Bytes;
use memaflow::model::{Package, zoo};
use memaflow::runtime;
use memaflow::spool;
#[cfg(feature = "demo")]
use memaflow::spool::demo;
use memaflow::tiling;
use std::path::{Path, PathBuf};
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
    Import(commands::import::ImportArgs),
    /// Run one input through a package and print a JSON summary of the outputs.
    Infer(commands::infer::InferArgs),
    /// Run many inferences at once (every input through every model) layer by layer,
    /// under a loading policy and a scheduler, within a memory budget.
    Batch(commands::batch::BatchArgs),
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
    /// Draw a result on its frame: boxes, keypoints, crop regions and landmarks.
    Show {
        /// A result, out/NAME.json.
        result: PathBuf,
        /// The frame (default: done/NAME beside the result's out/).
        #[arg(long, value_name = "PATH")]
        frame: Option<PathBuf>,
        /// The picture to write (PNG).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
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
    /// Run the demonstration: the default face pipeline on sample frames, one annotated
    /// picture per frame.
    #[cfg(feature = "demo")]
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
        configs: Vec<tiling::TilingConfig>,
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

fn main() {
    // Output piped into `head` must end quietly, as other Unix tools do, not panic.
    // SAFETY: restoring the default disposition of SIGPIPE installs no handler (so no
    // async-signal-safety concern), and runs before any thread exists.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        memaflow::memory::return_freed_memory_promptly(); // the daemon chooses for itself
    }
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
        Command::Import(args) => args
            .check()
            .and_then(|r| commands::import::run(&r))
            .map(|summary| println!("{summary}")),
        Command::Infer(args) => args
            .check()
            .and_then(|r| commands::infer::run(&r))
            .and_then(|summary| print_json(&summary)),
        Command::Batch(args) => args
            .check()
            .and_then(|r| commands::batch::run(&r))
            .and_then(|summary| print_json(&summary)),
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
        #[cfg(feature = "demo")]
        Command::Demo { dir } => demo::run(&dir.unwrap_or_else(demo::default_dir)),
        Command::Show { result, frame, out } => spool::show::show(&result, frame.as_deref(), &out)
            .map(|d| {
                println!(
                    "{}: {} box(es), {} crop region(s), {} landmark(s)",
                    out.display(),
                    d.boxes,
                    d.regions,
                    d.landmarks
                )
            }),
    };
    if let Err(e) = result {
        eprintln!("memaflow: error: {e:#}");
        std::process::exit(2);
    }
}

/// A summary as pretty JSON, keys in sorted order at every level (through `Value`, whose
/// maps are sorted), as `infer` and `batch` have always printed them.
fn print_json(summary: &impl serde::Serialize) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::to_value(summary)?)?
    );
    Ok(())
}

fn inspect(dir: &Path, json: bool) -> Result<()> {
    let pkg = Package::open(dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&pkg.manifest)?);
    } else {
        println!("{}", commands::inspect::LayerTable(&pkg.manifest));
    }
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
            let plan =
                memaflow::bench::plan::ExperimentPlan::read(plan)?.only_workloads(&a.workloads)?;
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
        .map(|(s, n)| format!("{n} {s}"))
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
            let model = tiling::predictor::Predictor::new(&pkg, tiling::predictor::CALIBRATION)?;
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
            let model = tiling::predictor::Predictor::new(&pkg, tiling::predictor::CALIBRATION)?;
            for config in configs {
                println!("{}", serde_json::to_string(&model.prediction(&config)?)?);
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
