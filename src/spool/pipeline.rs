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
use super::schema::{
    FrameMemory, FrameResult, FrameStage, FrameTimes, LayerCounts, ModelError, ModelMemory,
    ModelOutcome, ModelResult, ModelRun, ModelStage, ModelTimes,
};
use crate::memory::SystemMemory;
use crate::model::{Package, Preprocess};
use crate::runtime::{Executor, InferenceOutput, LayerCost, ModelId};
use crate::tiling::TiledModel;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub struct Model {
    /// The package's name, or its directory's name when it cannot be opened.
    pub name: String,
    pub path: PathBuf,
    ready: Result<Ready, ModelError>,
}

struct Ready {
    package: Arc<Package>,
    /// Its registration with the executor: inferences of it share resident layers.
    id: ModelId,
    /// Set when the package runs tiled (a layer too large for the budget, or `tiling =
    /// "auto"`).
    tiled: Option<TiledModel>,
    preprocess: Preprocess,
    report: Report,
}

impl Model {
    /// Opens and checks a configured model, decides whether it runs tiled under `run`
    /// (without a budget, under the memory `system` has free now) and registers it with
    /// the executor; a broken one is kept, with the reason.
    pub fn load(
        config: &ModelConfig,
        run: &RunConfig,
        system: &SystemMemory,
        executor: &Executor,
    ) -> Model {
        let fallback = config.path.file_name().map_or_else(
            || config.path.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        let ready = check_package(config, run, system, executor);
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

    /// Its entry in a result when it produced nothing.
    fn failed(&self, error: ModelError) -> ModelResult {
        ModelResult {
            name: self.name.clone(),
            outcome: ModelOutcome::Failed { error },
        }
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
    executor: &Executor,
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
    let costs: Arc<[LayerCost]> = crate::profile::estimate_package(&package).into();
    let package = Arc::new(package);
    let budget = run
        .budget
        .or_else(|| system.read().ok().and_then(|r| r.headroom(run.reserve)));
    let tiled = TiledModel::plan(&package, &costs, run.tiling, budget)
        .map_err(|e| broken(format!("{e:#}"), None))?;
    let id = match &tiled {
        Some(t) => executor.add_model(package.clone(), t.costs(), Some(t.run())),
        None => executor.add_model(package.clone(), costs, None),
    }
    .map_err(|e| broken(format!("{e:#}"), None))?;
    Ok(Ready {
        package,
        id,
        tiled,
        preprocess,
        report: config.report.clone(),
    })
}

/// Why a frame failed as a whole.
#[derive(Clone, Debug)]
pub struct FrameError {
    pub stage: FrameStage,
    pub reason: String,
    /// With `FrameStage::Inference`: each model's error.
    pub models: Vec<ModelResult>,
}

pub enum Outcome {
    Done(Box<FrameResult>),
    Failed(FrameError),
}

pub struct Setup<'a> {
    pub models: &'a [Model],
    pub run: &'a RunConfig,
    pub max_frame_bytes: u64,
    pub executor: &'a Executor,
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn frame_error(stage: FrameStage, e: anyhow::Error) -> Outcome {
    Outcome::Failed(FrameError {
        stage,
        reason: format!("{e:#}"),
        models: vec![],
    })
}

pub fn process(frame: &str, path: &Path, cx: &Setup) -> Outcome {
    let t0 = Instant::now();
    let bytes = match read_frame(path, cx.max_frame_bytes) {
        Ok(b) => b,
        Err(e) => return frame_error(FrameStage::Read, e),
    };
    // The decoded frame, its converted copy and the models' inputs made from it are
    // counted in the memory gate before they exist: a frame too large to decode within
    // the limit fails, it does not kill. Once the inputs are made and submitted, the
    // reading shows them (and their inferences reserve them again when they start).
    let inputs_bytes: u64 = cx
        .models
        .iter()
        .filter_map(|m| m.ready.as_ref().ok())
        .map(|r| r.package.manifest.inputs[0].shape.iter().product::<usize>() as u64 * 4)
        .sum();
    let decoding = match preprocess::decoded_bytes(&bytes).and_then(|need| {
        cx.executor
            .reserve(need + inputs_bytes)
            .map_err(|e| e.context("decoding the frame"))
    }) {
        Ok(r) => r,
        Err(e) => return frame_error(FrameStage::Decode, e),
    };
    let img = match preprocess::decode(&bytes) {
        Ok(img) => img,
        Err(e) => return frame_error(FrameStage::Decode, e),
    };
    let n_bytes = bytes.len();
    drop(bytes);
    let decoded = t0.elapsed();
    let (fw, fh) = (img.width(), img.height());

    let mut entries: Vec<Option<ModelResult>> = vec![None; cx.models.len()];
    let submitted_ms = cx.executor.now_ms();
    let mut running: Vec<(usize, usize)> = vec![];
    for (k, m) in cx.models.iter().enumerate() {
        match &m.ready {
            Err(e) => entries[k] = Some(m.failed(e.clone())),
            Ok(r) => {
                let shape = &r.package.manifest.inputs[0].shape;
                match preprocess::to_input(&img, &r.preprocess, shape) {
                    Ok(input) => running.push((k, cx.executor.submit(r.id, input))),
                    Err(e) => {
                        entries[k] = Some(m.failed(ModelError {
                            stage: ModelStage::Preprocess,
                            reason: format!("{e:#}"),
                            layer: None,
                        }));
                    }
                }
            }
        }
    }
    drop(img);
    drop(decoding);
    let t_run = Instant::now();
    let mut high_water = 0;
    for (k, id) in running {
        let out = cx.executor.wait(id);
        high_water = high_water.max(out.summary.ledger_high_water);
        entries[k] = Some(model_entry(&cx.models[k], out, submitted_ms, (fw, fh)));
    }
    let inference = t_run.elapsed();
    let models: Vec<ModelResult> = entries.into_iter().flatten().collect();
    if models.iter().all(|m| m.error().is_some()) {
        return Outcome::Failed(no_model_succeeded(models));
    }
    Outcome::Done(Box::new(FrameResult {
        frame: frame.to_string(),
        bytes: n_bytes as u64,
        width: fw,
        height: fh,
        processed_unix: unix_now(),
        models,
        time_ms: FrameTimes {
            decode: ms(decoded),
            inference: ms(inference),
            total: ms(t0.elapsed()),
        },
        memory: FrameMemory {
            budget_bytes: cx.run.budget,
            ledger_high_water_bytes: high_water,
            peak_rss_bytes: cx.executor.peak_rss(),
        },
    }))
}

fn no_model_succeeded(models: Vec<ModelResult>) -> FrameError {
    let reasons: Vec<String> = models
        .iter()
        .filter_map(|m| Some(format!("{}: {}", m.name, m.error()?.reason)))
        .collect();
    FrameError {
        stage: FrameStage::Inference,
        reason: if reasons.is_empty() {
            "no models are configured".into()
        } else {
            format!("no model produced outputs: {}", reasons.join("; "))
        },
        models,
    }
}

fn round3(v: f64) -> f64 {
    (v * 1e3).round() / 1e3
}

/// One model's entry in a frame's result: its outputs as configured, or why there are none.
fn model_entry(
    m: &Model,
    out: InferenceOutput,
    submitted_ms: f64,
    (fw, fh): (u32, u32),
) -> ModelResult {
    let r = match &m.ready {
        Ok(r) => r,
        Err(e) => return m.failed(e.clone()),
    };
    let outputs = match out.outputs {
        Ok(o) => o,
        Err(e) => {
            return m.failed(ModelError {
                stage: ModelStage::Inference,
                reason: format!("{e:#}"),
                layer: None,
            });
        }
    };
    let shape = &r.package.manifest.inputs[0].shape;
    let geometry = Geometry::new(
        r.preprocess.resize,
        fw,
        fh,
        shape[2] as u32,
        shape[1] as u32,
    );
    let t = out.timing;
    match r
        .report
        .render(&r.package.manifest.outputs, &outputs, &geometry)
    {
        Ok(outputs) => ModelResult {
            name: m.name.clone(),
            outcome: ModelOutcome::Ran(Box::new(ModelRun {
                outputs,
                time_ms: Some(ModelTimes {
                    start: round3(t.start_ms - submitted_ms),
                    end: round3(t.end_ms - submitted_ms),
                    load: round3(t.load_ms),
                    exec: round3(t.exec_ms),
                }),
                layers: Some(LayerCounts {
                    loaded: out.summary.misses,
                    resident: out.summary.hits,
                }),
                memory: Some(ModelMemory {
                    ledger_high_water_bytes: out.summary.share_high_water,
                }),
            })),
        },
        Err(e) => m.failed(ModelError {
            stage: ModelStage::Report,
            reason: format!("{e:#}"),
            layer: None,
        }),
    }
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_secs_f64() * 1e3).round() / 1e3)
}
