//! One frame through every configured model: read (refusing what is not a plain file),
//! decode within limits, preprocess per model, run the models as one batch under the
//! scheduler and the memory budget, and report their outputs as configured.
//!
//! Cascades (`[model.input]`) run after their source: each of the source's best
//! detections becomes a region, cropped from the frame into the cascade's input; all of a
//! frame's crops are submitted together, and each crop's points are reported under its
//! detection (`Detection::crops`). The frame is kept (held in the memory ledger) until
//! the crops are made.
//!
//! A broken model must not take the others down. Packages are checked when the daemon
//! starts (manifest, and every layer file read and verified once); a model that fails the
//! check is reported as such in every result and not run. If the batch still fails (a
//! package damaged while running, a layer too large for the budget), each model is run
//! alone to find which one failed; the others' outputs are kept.

use super::config::{CascadeConfig, ModelConfig, RunConfig};
use super::crop;
use super::fsutil::read_frame;
use super::preprocess::{self, Geometry};
use super::results::OutputReport;
use super::schema::{
    CascadeSummary, CropOutcome, CropResult, FrameMemory, FrameResult, FrameStage, FrameTimes,
    LayerCounts, ModelError, ModelMemory, ModelOutcome, ModelResult, ModelRun, ModelStage,
    ModelTimes, Outputs,
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
    report: OutputReport,
    /// Set for a cascade: its source's index among the models, and its region.
    cascade: Option<(usize, CascadeConfig)>,
}

impl Ready {
    fn input_shape(&self) -> &[usize] {
        &self.package.manifest.inputs[0].shape
    }

    /// Bytes of one input tensor.
    fn input_bytes(&self) -> u64 {
        self.input_shape().iter().product::<usize>() as u64 * 4
    }
}

/// Loads every configured model in order (`Model::load`) and connects each cascade to its
/// source: an earlier model of that name reporting boxes, with the keypoints the region
/// rotates by. A cascade whose source is missing or unsuitable is broken, with the reason.
pub(crate) fn load_all(
    configs: &[ModelConfig],
    run: &RunConfig,
    system: &SystemMemory,
    executor: &Executor,
) -> Vec<Model> {
    let mut models: Vec<Model> = vec![];
    for config in configs {
        let mut m = Model::load(config, run, system, executor);
        if let (Some(input), Ok(ready)) = (&config.input, &mut m.ready) {
            match find_source(&models, input) {
                Ok(k) => ready.cascade = Some((k, input.clone())),
                Err(reason) => {
                    log::error!("model {} is unusable: {reason}", m.name);
                    m.ready = Err(ModelError {
                        stage: ModelStage::Package,
                        reason,
                        layer: None,
                    });
                }
            }
        }
        models.push(m);
    }
    models
}

fn find_source(earlier: &[Model], input: &CascadeConfig) -> Result<usize, String> {
    let k = earlier
        .iter()
        .position(|m| m.name == input.from)
        .ok_or_else(|| {
            format!(
                "input.from = {:?} names no model configured before it",
                input.from
            )
        })?;
    // A broken source fails the cascade per frame, naming the source's reason.
    let Ok(source) = &earlier[k].ready else {
        return Ok(k);
    };
    let OutputReport::Boxes(decoder) = &source.report else {
        return Err(format!(
            "input.from = {:?} is reported as {}, not boxes",
            input.from,
            source.report.name()
        ));
    };
    if let Some([a, b]) = input.roi.rotate_by {
        let n = decoder.spec.keypoints;
        if a.max(b) >= n {
            return Err(format!(
                "input.rotate_by = [{a}, {b}], but {} has {n} keypoints",
                input.from
            ));
        }
    }
    Ok(k)
}

impl Model {
    /// Opens and checks a configured model, decides whether it runs tiled under `run`
    /// (without a budget, under the memory `system` has free now) and registers it with
    /// the executor; a broken one is kept, with the reason.
    pub(crate) fn load(
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

    fn landmarks(&self) -> Option<&super::results::LandmarkSpec> {
        match &self.ready.as_ref().ok()?.report {
            OutputReport::Landmarks(spec) => Some(spec),
            _ => None,
        }
    }

    /// Its entry in a result when it produced nothing.
    fn failed(&self, error: ModelError) -> ModelResult {
        ModelResult {
            name: self.name.clone(),
            outcome: ModelOutcome::Failed { error },
        }
    }

    /// The tiling configuration it runs under, if it runs tiled.
    pub fn tiling(&self) -> Option<&crate::tiling::TilingConfig> {
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
    let tiled = TiledModel::plan(&package, &costs, &run.tiling, budget)
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
        cascade: None,
    })
}

/// Why a frame failed as a whole.
#[derive(Clone, Debug)]
pub(crate) struct FrameError {
    pub stage: FrameStage,
    pub reason: String,
    /// With `FrameStage::Inference`: each model's error.
    pub models: Vec<ModelResult>,
}

pub(crate) enum Outcome {
    Done(Box<FrameResult>),
    Failed(FrameError),
}

pub struct Setup<'a> {
    pub models: &'a [Model],
    pub run: &'a RunConfig,
    pub(crate) max_frame_bytes: u64,
    pub executor: &'a Executor,
    /// `[debug] dump_inputs`: every input tensor is written there.
    pub(crate) dump_inputs: Option<&'a Path>,
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
    let Decoded {
        rgb,
        bytes: n_bytes,
        decoding,
        kept,
    } = match decode(path, cx) {
        Ok(d) => d,
        Err((stage, e)) => return frame_error(stage, e),
    };
    let decoded = t0.elapsed();
    let (fw, fh) = rgb.dimensions();

    let submitted_ms = cx.executor.now_ms();
    let mut entries: Vec<Option<ModelResult>> = vec![None; cx.models.len()];
    let running = submit_whole_frame(frame, &rgb, cx, &mut entries);
    drop(decoding);
    let t_run = Instant::now();
    let mut high_water = 0;
    // Sources first: their cascades' crops are made as soon as they are done.
    let mut order = running;
    order.sort_by_key(|(k, _)| {
        !cx.models
            .iter()
            .any(|m| ready(m).is_some_and(|r| r.source() == Some(*k)))
    });
    for (k, id) in order {
        let mut out = cx.executor.wait(id);
        if out.refused_for_room() {
            out = retried_alone(frame, &rgb, cx, k).unwrap_or(out);
        }
        high_water = high_water.max(out.summary.ledger_high_water);
        entries[k] = Some(model_entry(&cx.models[k], out, submitted_ms, (fw, fh)));
    }
    let cascades = Cascades {
        cx,
        frame,
        submitted_ms,
    };
    match kept {
        None => {}
        Some(Err(reason)) => cascades.fail_all(&mut entries, &reason),
        Some(Ok(hold)) => {
            let crops = cascades.submit(&rgb, &mut entries);
            drop(rgb);
            drop(hold);
            high_water = high_water.max(cascades.finish(crops, &mut entries));
        }
    }
    let inference = t_run.elapsed();
    let models: Vec<ModelResult> = entries.into_iter().flatten().collect();
    if models.iter().all(|m| m.error().is_some()) {
        return Outcome::Failed(no_model_succeeded(models));
    }
    Outcome::Done(Box::new(FrameResult {
        frame: frame.to_string(),
        // The daemon sets it: it alone has the name's bytes.
        frame_bytes_hex: None,
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

/// A frame decoded to 8-bit RGB, with its reservations: `decoding` (brief, for the whole
/// frame models' inputs) and `kept` (the frame and its crops, for the cascades).
struct Decoded<'a> {
    rgb: image::RgbImage,
    bytes: usize,
    decoding: crate::runtime::executor::Reserved<'a>,
    /// `None` without cascades; the hold, or why it could not be had.
    kept: Option<Result<crate::runtime::executor::Reserved<'a>, String>>,
}

fn ready(m: &Model) -> Option<&Ready> {
    m.ready.as_ref().ok()
}

/// Reads and decodes the frame within the memory gate.
fn decode<'a>(path: &Path, cx: &Setup<'a>) -> Result<Decoded<'a>, (FrameStage, anyhow::Error)> {
    let bytes = read_frame(path, cx.max_frame_bytes).map_err(|e| (FrameStage::Read, e))?;
    let (need, pixels) = preprocess::decoded_bytes(&bytes).map_err(|e| (FrameStage::Decode, e))?;
    // The frame is kept for the cascades' crops: its RGB copy and the crops' inputs are
    // held in the ledger from before decoding until the crops are submitted. Nothing
    // waits for a hold (it outlives the detector's inference); if it cannot be had, the
    // cascades fail this frame with the reason and the other models run.
    let crops_bytes: u64 = cx
        .models
        .iter()
        .filter_map(ready)
        .filter_map(|r| Some(r.cascade.as_ref()?.1.max as u64 * r.input_bytes()))
        .sum();
    let kept = (crops_bytes > 0).then(|| {
        cx.executor
            .hold(pixels * 3 + crops_bytes)
            .map_err(|e| format!("{:#}", e.context("keeping the frame for the crops")))
    });
    // The decoded frame, its converted copy and the models' inputs made from it are
    // counted in the memory gate before they exist: a frame too large to decode within
    // the limit fails, it does not kill. Once the inputs are made and submitted, the
    // reading shows them (and their inferences reserve them again when they start).
    let inputs_bytes: u64 = cx
        .models
        .iter()
        .filter_map(ready)
        .filter(|r| r.cascade.is_none())
        .map(Ready::input_bytes)
        .sum();
    let frame_held = if matches!(kept, Some(Ok(_))) {
        pixels * 3
    } else {
        0
    };
    let decoding = cx
        .executor
        .reserve(need - frame_held.min(need) + inputs_bytes)
        .map_err(|e| (FrameStage::Decode, e.context("decoding the frame")))?;
    let rgb = preprocess::decode(&bytes)
        .map_err(|e| (FrameStage::Decode, e))?
        .into_rgb8();
    Ok(Decoded {
        rgb,
        bytes: bytes.len(),
        decoding,
        kept,
    })
}

impl Ready {
    fn source(&self) -> Option<usize> {
        self.cascade.as_ref().map(|c| c.0)
    }
}

/// Preprocesses the frame for every model that takes it whole and submits them all;
/// returns (model index, inference id) for each, and fills `entries` for the models that
/// fail before running.
fn submit_whole_frame(
    frame: &str,
    rgb: &image::RgbImage,
    cx: &Setup,
    entries: &mut [Option<ModelResult>],
) -> Vec<(usize, usize)> {
    let mut running = vec![];
    for (k, m) in cx.models.iter().enumerate() {
        let r = match &m.ready {
            Err(e) => {
                entries[k] = Some(m.failed(e.clone()));
                continue;
            }
            Ok(r) if r.cascade.is_some() => continue,
            Ok(r) => r,
        };
        match preprocess::to_input_rgb(rgb, &r.preprocess, r.input_shape()) {
            Ok(input) => {
                dump_input(cx, frame, &m.name, None, &input);
                running.push((k, cx.executor.submit(r.id, input)));
            }
            Err(e) => {
                entries[k] = Some(m.failed(ModelError {
                    stage: ModelStage::Preprocess,
                    reason: format!("{e:#}"),
                    layer: None,
                }));
            }
        }
    }
    running
}

/// Runs model `k` on the frame again, alone: refused for room beside the other
/// inferences and frames in flight, it may well fit once they are done, and a refusal
/// should mean that it does not fit here at all. `None` (the first refusal stands) if
/// even its input cannot be made now.
fn retried_alone(
    frame: &str,
    rgb: &image::RgbImage,
    cx: &Setup,
    k: usize,
) -> Option<InferenceOutput> {
    let r = ready(&cx.models[k])?;
    let making = cx.executor.reserve(r.input_bytes()).ok()?;
    let input = preprocess::to_input_rgb(rgb, &r.preprocess, r.input_shape()).ok()?;
    let id = cx.executor.submit_alone(r.id, input);
    drop(making);
    log::info!(
        "{frame}: {} refused for room beside other work; running it again alone",
        cx.models[k].name
    );
    Some(cx.executor.wait(id))
}

/// `[debug] dump_inputs`: `DIR/FRAME/MODEL.npy`, or `MODEL.K.npy` for the crop of
/// detection K. A failure to write is logged, never fails the frame.
fn dump_input(
    cx: &Setup,
    frame: &str,
    model: &str,
    detection: Option<usize>,
    input: &crate::runtime::FloatTensor,
) {
    let Some(dir) = cx.dump_inputs else { return };
    let dir = dir.join(frame);
    let file = match detection {
        Some(k) => format!("{model}.{k}.npy"),
        None => format!("{model}.npy"),
    };
    let written = std::fs::create_dir_all(&dir)
        .map_err(anyhow::Error::from)
        .and_then(|()| crate::runtime::npy::write(&dir.join(&file), &input.shape, &input.data));
    if let Err(e) = written {
        log::warn!(
            "{frame}: dumping the input of {model} to {}: {e:#}",
            dir.display()
        );
    }
}

/// One crop of a frame: the cascade's index, the detection's, and its inference.
struct Crop {
    model: usize,
    detection: usize,
    state: CropState,
}

enum CropState {
    Submitted {
        roi: super::schema::Roi,
        id: usize,
    },
    /// Not made: the region (if there is one) and why.
    Refused {
        roi: Option<super::schema::Roi>,
        error: ModelError,
    },
}

/// The cascades of one frame.
struct Cascades<'a> {
    cx: &'a Setup<'a>,
    frame: &'a str,
    submitted_ms: f64,
}

impl Cascades<'_> {
    fn each(&self) -> impl Iterator<Item = (usize, &Model, &Ready, usize, &CascadeConfig)> {
        self.cx.models.iter().enumerate().filter_map(|(k, m)| {
            let r = m.ready.as_ref().ok()?;
            let (source, config) = r.cascade.as_ref()?;
            Some((k, m, r, *source, config))
        })
    }

    /// Every cascade fails this frame with `reason`.
    fn fail_all(&self, entries: &mut [Option<ModelResult>], reason: &str) {
        for (k, m, ..) in self.each() {
            entries[k] = Some(m.failed(ModelError {
                stage: ModelStage::Preprocess,
                reason: reason.to_string(),
                layer: None,
            }));
        }
    }

    /// Crops each source's best detections for its cascades and submits them all; a
    /// cascade whose source failed gets the source's reason.
    fn submit(&self, rgb: &image::RgbImage, entries: &mut [Option<ModelResult>]) -> Vec<Crop> {
        let mut crops = vec![];
        for (k, m, r, source, config) in self.each() {
            let source_entry = entries[source].as_ref();
            let Some(found) = source_entry.and_then(ModelResult::detections) else {
                let why = source_entry
                    .and_then(ModelResult::error)
                    .map_or_else(|| "it reports no boxes".into(), |e| e.reason.clone());
                entries[k] = Some(m.failed(ModelError {
                    stage: ModelStage::Source,
                    reason: format!("{} failed: {why}", config.from),
                    layer: None,
                }));
                continue;
            };
            let detections = &found.detections;
            for (i, d) in detections.iter().take(config.max).enumerate() {
                let made = config.roi.roi(d).and_then(|roi| {
                    let input =
                        crop::crop_input(rgb, &roi, config.border, &r.preprocess, r.input_shape())?;
                    Ok((roi, input))
                });
                let crop = match made {
                    Ok((roi, input)) => {
                        dump_input(self.cx, self.frame, &m.name, Some(i), &input);
                        Crop {
                            model: k,
                            detection: i,
                            state: CropState::Submitted {
                                roi,
                                id: self.cx.executor.submit(r.id, input),
                            },
                        }
                    }
                    Err(e) => Crop {
                        model: k,
                        detection: i,
                        state: CropState::Refused {
                            roi: config.roi.roi(d).ok(),
                            error: ModelError {
                                stage: ModelStage::Preprocess,
                                reason: format!("{e:#}"),
                                layer: None,
                            },
                        },
                    },
                };
                crops.push(crop);
            }
        }
        crops
    }

    /// Waits for every crop, puts each one's points under its detection, and writes each
    /// cascade's entry; returns the ledger's high-water mark meanwhile.
    fn finish(&self, crops: Vec<Crop>, entries: &mut [Option<ModelResult>]) -> u64 {
        let mut high_water = 0;
        let mut totals: Vec<CropTotals> = vec![CropTotals::default(); entries.len()];
        let mut results: Vec<(usize, usize, CropResult)> = vec![];
        for c in crops {
            let model = &self.cx.models[c.model];
            let (roi, outcome) = match c.state {
                CropState::Refused { roi, error } => (roi, CropOutcome::Failed { error }),
                CropState::Submitted { roi, id } => {
                    let out = self.cx.executor.wait(id);
                    high_water = high_water.max(out.summary.ledger_high_water);
                    totals[c.model].add(&out, self.submitted_ms);
                    (Some(roi), crop_outcome(model, out, &roi, self.submitted_ms))
                }
            };
            if let CropOutcome::Ran(l) = &outcome {
                totals[c.model].found += usize::from(l.present);
            }
            totals[c.model].crops += 1;
            let source = self.each().find(|e| e.0 == c.model).map_or(0, |e| e.3);
            let result = CropResult {
                model: model.name.clone(),
                roi,
                outcome,
            };
            results.push((source, c.detection, result));
        }
        for (source, detection, result) in results {
            if let Some(Outputs::Boxes(d)) = entries[source].as_mut().and_then(outputs_mut) {
                d.detections[detection].crops.push(result);
            }
        }
        for (k, m, _, _, config) in self.each() {
            if entries[k].is_none() {
                entries[k] = Some(totals[k].entry(m, &config.from));
            }
        }
        high_water
    }
}

fn outputs_mut(m: &mut ModelResult) -> Option<&mut Outputs> {
    match &mut m.outcome {
        ModelOutcome::Ran(run) => Some(&mut run.outputs),
        ModelOutcome::Failed { .. } => None,
    }
}

/// One crop's points in the frame, or why there are none.
fn crop_outcome(
    m: &Model,
    out: InferenceOutput,
    roi: &super::schema::Roi,
    submitted_ms: f64,
) -> CropOutcome {
    let failed = |stage, e: anyhow::Error| CropOutcome::Failed {
        error: ModelError {
            stage,
            reason: format!("{e:#}"),
            layer: None,
        },
    };
    let outputs = match out.outputs {
        Ok(o) => o,
        Err(e) => return failed(ModelStage::Inference, e),
    };
    let (Ok(r), Some(spec)) = (&m.ready, m.landmarks()) else {
        return failed(
            ModelStage::Report,
            anyhow::anyhow!("{} is not a cascade reporting landmarks", m.name),
        );
    };
    let shape = r.input_shape();
    match spec.decode(
        &r.package.manifest.outputs,
        &outputs,
        roi,
        (shape[2], shape[1]),
        times(&out.timing, submitted_ms),
    ) {
        Ok(l) => CropOutcome::Ran(Box::new(l)),
        Err(e) => failed(ModelStage::Report, e),
    }
}

fn times(t: &crate::runtime::InferenceTiming, submitted_ms: f64) -> ModelTimes {
    ModelTimes {
        start: round3(t.start_ms - submitted_ms),
        end: round3(t.end_ms - submitted_ms),
        load: round3(t.load_ms),
        exec: round3(t.exec_ms),
    }
}

/// A cascade's crops of one frame, summed.
#[derive(Clone, Default)]
struct CropTotals {
    crops: usize,
    found: usize,
    ran: usize,
    time: Option<ModelTimes>,
    layers: LayerCounts,
    share_high_water: u64,
}

impl CropTotals {
    fn add(&mut self, out: &InferenceOutput, submitted_ms: f64) {
        let t = times(&out.timing, submitted_ms);
        self.ran += 1;
        self.time = Some(match self.time {
            None => t,
            Some(s) => ModelTimes {
                start: s.start.min(t.start),
                end: s.end.max(t.end),
                load: round3(s.load + t.load),
                exec: round3(s.exec + t.exec),
            },
        });
        self.layers.loaded += out.summary.misses;
        self.layers.resident += out.summary.hits;
        self.share_high_water = self.share_high_water.max(out.summary.share_high_water);
    }

    fn entry(&self, m: &Model, from: &str) -> ModelResult {
        ModelResult {
            name: m.name.clone(),
            outcome: ModelOutcome::Ran(Box::new(ModelRun {
                outputs: Outputs::Landmarks(CascadeSummary {
                    from: from.to_string(),
                    crops: self.crops,
                    found: self.found,
                }),
                time_ms: self.time,
                layers: (self.ran > 0).then_some(self.layers),
                memory: (self.ran > 0).then_some(ModelMemory {
                    ledger_high_water_bytes: self.share_high_water,
                }),
            })),
        }
    }
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
    match r
        .report
        .render(&r.package.manifest.outputs, &outputs, &geometry)
    {
        Ok(outputs) => ModelResult {
            name: m.name.clone(),
            outcome: ModelOutcome::Ran(Box::new(ModelRun {
                outputs,
                time_ms: Some(times(&out.timing, submitted_ms)),
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
