//! One frame through every configured model: read (refusing what is not a plain file),
//! decode within limits, preprocess per model, run the models as one batch under the
//! scheduler and the memory budget, and report their outputs as configured.
//!
//! A broken model must not take the others down. Packages are checked when the daemon
//! starts (manifest, and every layer file read and verified once); a model that fails the
//! check is reported as such in every result and not run. If the batch still fails (a
//! package damaged while running, a layer too large for the budget), each model is run
//! alone to find which one failed; the others' outputs are kept.

use super::config::{ModelConfig, RunConfig};
use super::fsutil::read_frame;
use super::preprocess::{self, Geometry};
use super::results::Report;
use crate::memory::{self, SystemMemory};
use crate::model::{Package, Preprocess};
use crate::runtime::{self, BatchOptions, BatchReport, FloatTensor, Job, LayerCost, TaskKind};
use crate::tiling::TiledModel;
use serde::Serialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Where a model failed.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelStage {
    /// The start-up check of the package.
    Package,
    Preprocess,
    Inference,
    /// Rendering the outputs as configured.
    Report,
}

/// Why a model produced no outputs for a frame.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelError {
    pub stage: ModelStage,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
}

pub struct Model {
    /// The package's name, or its directory's name when it cannot be opened.
    pub name: String,
    pub path: PathBuf,
    ready: Result<Ready, ModelError>,
}

struct Ready {
    package: Arc<Package>,
    costs: Arc<[LayerCost]>,
    /// Set when the package runs tiled (a layer too large for the budget, or `tiling =
    /// "auto"`).
    tiled: Option<TiledModel>,
    preprocess: Preprocess,
    report: Report,
}

impl Model {
    /// Opens and checks a configured model and decides whether it runs tiled under `run`
    /// (without a budget, under the memory `system` has free now); a broken one is kept,
    /// with the reason.
    pub fn load(config: &ModelConfig, run: &RunConfig, system: &SystemMemory) -> Model {
        let fallback = config.path.file_name().map_or_else(
            || config.path.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        let ready = check_package(config, run, system);
        let name = match &ready {
            Ok(r) => r.package.name().to_string(),
            Err(_) => fallback,
        };
        if let Err(e) = &ready {
            log::error!(
                "model {name} ({}) is unusable, every result will say so: {}",
                config.path.display(),
                e.reason
            );
        }
        Model {
            name,
            path: config.path.clone(),
            ready,
        }
    }

    pub fn error(&self) -> Option<&ModelError> {
        self.ready.as_ref().err()
    }

    /// The tiling configuration it runs under, if it runs tiled.
    pub fn tiling(&self) -> Option<&crate::tiling::Config> {
        self.ready.as_ref().ok()?.tiled.as_ref().map(|t| &t.config)
    }
}

fn check_package(
    config: &ModelConfig,
    run: &RunConfig,
    system: &SystemMemory,
) -> Result<Ready, ModelError> {
    let broken = |reason: String, layer| ModelError {
        stage: ModelStage::Package,
        reason,
        layer,
    };
    let package = Package::open(&config.path).map_err(|e| broken(format!("{e:#}"), None))?;
    for i in 0..package.manifest.layers.len() {
        package
            .read_layer(i)
            .map_err(|e| broken(format!("{e:#}"), Some(i)))?;
    }
    let input = &package.manifest.inputs[0];
    let shape = &input.shape;
    if !(shape.len() == 4 && shape[0] == 1 && (shape[3] == 1 || shape[3] == 3)) {
        return Err(broken(
            format!(
                "input '{}' is {shape:?}; the spool feeds images, [1, H, W, 1 or 3]",
                input.name
            ),
            None,
        ));
    }
    let preprocess = config.preprocess.apply(&package.manifest.preprocess);
    if !(preprocess.mean.len() == 1 || preprocess.mean.len() == shape[3]) {
        return Err(broken(
            format!(
                "preprocess has {} mean/std values for {} channels",
                preprocess.mean.len(),
                shape[3]
            ),
            None,
        ));
    }
    config
        .report
        .check(&package.manifest.outputs)
        .map_err(|e| broken(format!("{e:#}"), None))?;
    let costs: Arc<[LayerCost]> = crate::profile::estimate(&package.manifest).into();
    let package = Arc::new(package);
    let budget = run
        .budget
        .or_else(|| system.read().ok().and_then(|r| r.headroom(run.reserve)));
    let tiled = TiledModel::plan(&package, &costs, run.tiling, budget)
        .map_err(|e| broken(format!("{e:#}"), None))?;
    Ok(Ready {
        package,
        costs,
        tiled,
        preprocess,
        report: config.report.clone(),
    })
}

/// Where a frame failed as a whole.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FrameStage {
    /// Refused (not a plain file, too large) or unreadable.
    Read,
    Decode,
    /// No model produced outputs.
    Inference,
    /// Processing panicked: a bug.
    Internal,
}

impl FrameStage {
    pub fn name(self) -> &'static str {
        match self {
            FrameStage::Read => "read",
            FrameStage::Decode => "decode",
            FrameStage::Inference => "inference",
            FrameStage::Internal => "internal",
        }
    }
}

/// Why a frame failed as a whole.
#[derive(Clone, Debug, Serialize)]
pub struct FrameError {
    pub stage: FrameStage,
    pub reason: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<Value>,
}

pub enum Outcome {
    Done(Value),
    Failed(FrameError),
}

pub struct Setup<'a> {
    pub models: &'a [Model],
    pub run: &'a RunConfig,
    pub max_frame_bytes: u64,
    pub system: &'a SystemMemory,
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub fn process(frame: &str, path: &Path, cx: &Setup) -> Outcome {
    let t0 = Instant::now();
    let bytes = match read_frame(path, cx.max_frame_bytes) {
        Ok(b) => b,
        Err(e) => {
            return Outcome::Failed(FrameError {
                stage: FrameStage::Read,
                reason: format!("{e:#}"),
                models: vec![],
            });
        }
    };
    let img = match preprocess::decode(&bytes) {
        Ok(img) => img,
        Err(e) => {
            return Outcome::Failed(FrameError {
                stage: FrameStage::Decode,
                reason: format!("{e:#}"),
                models: vec![],
            });
        }
    };
    let n_bytes = bytes.len();
    drop(bytes);
    let decoded = t0.elapsed();
    let (fw, fh) = (img.width(), img.height());

    let mut entries: Vec<Option<Value>> = vec![None; cx.models.len()];
    let mut jobs: Vec<(usize, Job)> = vec![];
    for (k, m) in cx.models.iter().enumerate() {
        match &m.ready {
            Err(e) => entries[k] = Some(error_entry(m, e)),
            Ok(r) => {
                let shape = &r.package.manifest.inputs[0].shape;
                match preprocess::to_input(&img, &r.preprocess, shape) {
                    Ok(input) => jobs.push((
                        k,
                        match &r.tiled {
                            Some(t) => t.job(input),
                            None => Job::layered(r.package.clone(), input, r.costs.clone()),
                        },
                    )),
                    Err(e) => {
                        let err = ModelError {
                            stage: ModelStage::Preprocess,
                            reason: format!("{e:#}"),
                            layer: None,
                        };
                        entries[k] = Some(error_entry(m, &err));
                    }
                }
            }
        }
    }
    drop(img);
    let t_run = Instant::now();
    let _ = memory::reset_peak();
    let (runs, batch) = run_jobs(&jobs, cx);
    let inference = t_run.elapsed();
    for ((k, _), run) in jobs.iter().zip(runs) {
        let m = &cx.models[*k];
        entries[*k] = Some(match (&m.ready, run) {
            (Ok(r), Ok(run)) => {
                let shape = &r.package.manifest.inputs[0].shape;
                let geometry = Geometry::new(
                    r.preprocess.resize,
                    fw,
                    fh,
                    shape[2] as u32,
                    shape[1] as u32,
                );
                match r
                    .report
                    .render(&r.package.manifest.outputs, &run.outputs, &geometry)
                {
                    Ok(outputs) => json!({
                        "name": m.name,
                        "report": r.report.name(),
                        "outputs": outputs,
                        "time_ms": run.time_ms,
                        "memory": { "ledger_high_water_bytes": run.ledger_high_water },
                    }),
                    Err(e) => error_entry(
                        m,
                        &ModelError {
                            stage: ModelStage::Report,
                            reason: format!("{e:#}"),
                            layer: None,
                        },
                    ),
                }
            }
            (Err(e), _) => error_entry(m, e),
            (_, Err(e)) => error_entry(m, &e),
        });
    }
    let models: Vec<Value> = entries.into_iter().flatten().collect();
    let succeeded = models.iter().filter(|m| m.get("error").is_none()).count();
    if succeeded == 0 {
        let reasons: Vec<String> = models
            .iter()
            .map(|m| {
                format!(
                    "{}: {}",
                    m["name"].as_str().unwrap_or("?"),
                    m["error"]["reason"].as_str().unwrap_or("?")
                )
            })
            .collect();
        return Outcome::Failed(FrameError {
            stage: FrameStage::Inference,
            reason: if reasons.is_empty() {
                "no models are configured".into()
            } else {
                format!("no model produced outputs: {}", reasons.join("; "))
            },
            models,
        });
    }
    Outcome::Done(json!({
        "frame": frame,
        "bytes": n_bytes,
        "width": fw,
        "height": fh,
        "processed_unix": unix_now(),
        "models": models,
        "time_ms": {
            "decode": ms(decoded),
            "inference": ms(inference),
            "total": ms(t0.elapsed()),
        },
        "memory": batch,
    }))
}

fn error_entry(m: &Model, e: &ModelError) -> Value {
    json!({ "name": m.name, "error": e })
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_secs_f64() * 1e3).round() / 1e3)
}

struct ModelRun {
    outputs: Vec<FloatTensor>,
    time_ms: Value,
    ledger_high_water: u64,
}

fn options(run: &RunConfig) -> BatchOptions {
    BatchOptions {
        loading: run.loading,
        scheduling: run.scheduling,
        parallel: run.parallel,
        budget: run.budget,
        reserve: run.reserve,
        workers: run.threads,
    }
}

/// Runs the frame's jobs together; if that fails, each alone, so that the failure is
/// attributed to its model and the others' outputs are kept. Returns one result per job
/// and the memory figures of the run.
fn run_jobs(jobs: &[(usize, Job)], cx: &Setup) -> (Vec<Result<ModelRun, ModelError>>, Value) {
    let opts = options(cx.run);
    let all: Vec<Job> = jobs.iter().map(|(_, j)| j.clone()).collect();
    let all_costs: Vec<Arc<[LayerCost]>> = all.iter().map(|j| j.costs.clone()).collect();
    if all.is_empty() {
        return (vec![], Value::Null);
    }
    match runtime::run_batch(all, &opts, cx.system) {
        Ok(report) => {
            let memory = memory_of(&report, cx.run);
            (
                split_report(report, &all_costs)
                    .into_iter()
                    .map(Ok)
                    .collect(),
                memory,
            )
        }
        Err(together) => {
            log::warn!("the frame's batch failed ({together:#}); running each model alone");
            let mut high_water = 0;
            let mut peak_rss = 0;
            let runs = jobs
                .iter()
                .map(
                    |(_, job)| match runtime::run_batch(vec![job.clone()], &opts, cx.system) {
                        Ok(report) => {
                            high_water = high_water.max(report.ledger_high_water);
                            peak_rss = peak_rss.max(report.peak_rss);
                            split_report(report, std::slice::from_ref(&job.costs))
                                .pop()
                                .ok_or_else(|| ModelError {
                                    stage: ModelStage::Inference,
                                    reason: "the run returned no outputs".into(),
                                    layer: None,
                                })
                        }
                        Err(e) => Err(ModelError {
                            stage: ModelStage::Inference,
                            reason: format!("{e:#}"),
                            layer: None,
                        }),
                    },
                )
                .collect();
            let memory = json!({
                "budget_bytes": cx.run.budget,
                "ledger_high_water_bytes": high_water,
                "peak_rss_bytes": peak_rss,
                "models_run_alone": true,
            });
            (runs, memory)
        }
    }
}

fn memory_of(report: &BatchReport, run: &RunConfig) -> Value {
    json!({
        "budget_bytes": run.budget,
        "ledger_high_water_bytes": report.ledger_high_water,
        "overdrafts": report.overdrafts,
        "peak_rss_bytes": report.peak_rss,
    })
}

/// Per inference of a batch: outputs, timings, and the high-water mark of its share of
/// the scheduler's ledger.
fn split_report(report: BatchReport, costs: &[Arc<[LayerCost]>]) -> Vec<ModelRun> {
    let n = costs.len();
    let mut load = vec![0.0; n];
    let mut exec = vec![0.0; n];
    // The scheduler reserves a layer's whole footprint when its load starts and releases
    // it when its exec ends; replaying the timeline gives each inference's share.
    let mut events: Vec<Vec<(f64, i64)>> = vec![vec![]; n];
    for t in &report.tasks {
        let d = t.end_ms - t.start_ms;
        let Some(layers) = costs.get(t.inference) else {
            continue;
        };
        let footprint = |l: usize| {
            layers
                .get(l)
                .map_or(0, |c| (c.load_bytes + c.exec_bytes) as i64)
        };
        match t.kind {
            TaskKind::Load(l) => {
                load[t.inference] += d;
                events[t.inference].push((t.start_ms, footprint(l)));
            }
            TaskKind::Exec(l) => {
                exec[t.inference] += d;
                events[t.inference].push((t.end_ms, -footprint(l)));
            }
            TaskKind::Init => {}
        }
    }
    let high_water = |mut ev: Vec<(f64, i64)>| {
        // At equal times releases go first, as the scheduler completes before it admits.
        ev.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let (mut now, mut peak) = (0i64, 0i64);
        for (_, delta) in ev {
            now += delta;
            peak = peak.max(now);
        }
        peak as u64
    };
    let round = |v: f64| (v * 1e3).round() / 1e3;
    report
        .outputs
        .into_iter()
        .zip(&report.inferences)
        .zip(events)
        .enumerate()
        .map(|(k, ((outputs, rec), ev))| ModelRun {
            outputs,
            time_ms: json!({
                "start": round(rec.start_ms),
                "end": round(rec.end_ms),
                "load": round(load[k]),
                "exec": round(exec[k]),
            }),
            ledger_high_water: high_water(ev),
        })
        .collect()
}
