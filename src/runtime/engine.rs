//! The only place that talks to tract: plans from TFLite bytes, and running them.

use super::FloatTensor;
use crate::model::Package;
use anyhow::{Context, Result, anyhow};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};
use tract_core::prelude::*;

/// An optimised, runnable tract model.
#[derive(Clone, Debug)]
pub struct Plan(Arc<TypedRunnableModel>);

impl Plan {
    /// Parses and optimises a TFLite model. The bytes must come from our writer (checked by
    /// `read_graph` first): tract's reader trusts its input. Takes the buffer so that tract
    /// parses it in place: a copy would hold the weights three times at once.
    pub fn from_tflite(bytes: Vec<u8>) -> Result<Plan> {
        let model = optimised(bytes, &mut LoadPhases::default())?;
        Plan::from_model(model)
    }

    /// The runnable plan of an optimised model.
    pub(super) fn from_model(model: TypedModel) -> Result<Plan> {
        guard("planning", || Ok(Plan(model.into_runnable()?)))
    }

    /// The optimised graph the plan runs.
    pub(super) fn model(&self) -> &TypedModel {
        self.0.model()
    }

    pub(crate) fn run(&self, inputs: TVec<TValue>) -> Result<TVec<TValue>> {
        guard("running", || self.0.run(inputs))
    }

    /// Runs on plain float tensors (copies in and out; for tools and tests).
    pub fn run_floats(&self, inputs: &[FloatTensor]) -> Result<Vec<FloatTensor>> {
        let inputs = inputs.iter().map(to_tvalue).collect::<Result<TVec<_>>>()?;
        self.run(inputs)?.iter().map(from_tvalue).collect()
    }

    /// Runs on float tensors given up by the caller: their buffers move into tract instead
    /// of being copied, so an input is never held twice (tiled execution's memory bound).
    pub(crate) fn run_owned(&self, inputs: Vec<FloatTensor>) -> Result<Vec<FloatTensor>> {
        let inputs = inputs
            .into_iter()
            .map(|t| {
                let array = tract_ndarray::ArrayD::from_shape_vec(t.shape, t.data)?;
                Ok(array.into_tensor().into_tvalue())
            })
            .collect::<Result<TVec<_>>>()?;
        self.run(inputs)?.iter().map(from_tvalue).collect()
    }
}

/// Parses TFLite bytes into tract's graph, as its reader builds it (no pass run yet).
pub(super) fn parse(bytes: Vec<u8>) -> Result<TypedModel> {
    guard("reading", || {
        tract_tflite::tflite().model_for_read(&mut HandOver(Some(bytes)))
    })
}

/// tract's declutter (less one pass, see `declutter_within_layers`) and codegen.
pub(super) fn optimise(model: &mut TypedModel, phases: &mut LoadPhases) -> Result<()> {
    let t = Instant::now();
    guard("decluttering", || declutter_within_layers().optimize(model))?;
    phases.declutter += t.elapsed();
    let t = Instant::now();
    guard("optimising", || model.optimize())?;
    phases.optimize += t.elapsed();
    Ok(())
}

/// Parsed and optimised, timing each phase.
fn optimised(bytes: Vec<u8>, phases: &mut LoadPhases) -> Result<TypedModel> {
    let t = Instant::now();
    let mut model = parse(bytes)?;
    phases.parse += t.elapsed();
    optimise(&mut model, phases)?;
    Ok(model)
}

/// Where the time of loading layers went (`load_layer_timed`; `benches/reload.rs` prints
/// it per model).
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadPhases {
    /// Reading the file and checking it (size, flatbuffer verifier, ops, manifest).
    pub read: Duration,
    /// tract's TFLite reader building its graph.
    pub parse: Duration,
    /// tract's declutter passes.
    pub declutter: Duration,
    /// tract's codegen: kernel choice, weight packing, fusing.
    pub optimize: Duration,
    /// The runnable plan: evaluation order, constants.
    pub plan: Duration,
}

impl LoadPhases {
    /// The whole load: every phase summed.
    pub fn total(&self) -> Duration {
        self.read + self.parse + self.declutter + self.optimize + self.plan
    }
}

impl std::ops::AddAssign for LoadPhases {
    fn add_assign(&mut self, o: LoadPhases) {
        self.read += o.read;
        self.parse += o.parse;
        self.declutter += o.declutter;
        self.optimize += o.optimize;
        self.plan += o.plan;
    }
}

/// A reader that gives its whole buffer away. tract reads a model with `read_to_end` into
/// an empty vector and keeps that vector while it builds the graph; handing ours over
/// instead of copying it keeps one copy of the file's weights, not two, next to the
/// tensors tract makes from them.
struct HandOver(Option<Vec<u8>>);

impl std::io::Read for HandOver {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        // Only reached by callers that do not use `read_to_end`: serve the bytes in order.
        let Some(buf) = self.0.as_mut() else {
            return Ok(0);
        };
        let n = out.len().min(buf.len());
        out[..n].copy_from_slice(&buf[..n]);
        buf.drain(..n);
        Ok(n)
    }

    fn read_to_end(&mut self, out: &mut Vec<u8>) -> std::io::Result<usize> {
        let Some(mut buf) = self.0.take() else {
            return Ok(0);
        };
        let n = buf.len();
        if out.is_empty() {
            std::mem::swap(out, &mut buf);
        } else {
            out.extend_from_slice(&buf);
        }
        Ok(n)
    }
}

/// tract's decluttering passes, less the one that rewrites a matmul over a concatenation
/// into a sum of matmuls over its parts. That rewrite changes the summation order, and it
/// can only fire when the concatenation and its consumer are in one plan: with it, a whole
/// model (GoogLeNet's inception blocks) and the same model run layer by layer would differ
/// in the last bits. Every plan, layer or whole, uses this optimiser so they agree exactly.
fn declutter_within_layers() -> tract_core::optim::Optimizer {
    let mut optimizer = tract_core::optim::Optimizer::declutter();
    optimizer
        .passes
        .retain(|pass| !format!("{pass:?}").starts_with("ConcatThenEinsum"));
    optimizer
}

/// Turns a tract error or panic into an error value: the daemon must outlive a bad model.
fn guard<T>(what: &str, f: impl FnOnce() -> TractResult<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow!("tract failed {what} the model: {e:?}")),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(anyhow!("tract panicked {what} the model: {msg}"))
        }
    }
}

/// One layer, parsed and optimised, its weights resident until it is dropped.
#[derive(Clone, Debug)]
pub struct LoadedLayer {
    /// The layer's index in its package.
    pub index: usize,
    /// Its tract plan, ready to run.
    pub plan: Plan,
}

/// Reads (checking it, see [`Package::read_layer`]), parses and plans layer `index`.
pub fn load_layer(pkg: &Package, index: usize) -> Result<LoadedLayer> {
    load_layer_timed(pkg, index, &mut LoadPhases::default())
}

/// `load_layer`, adding the time of each phase to `phases`.
pub fn load_layer_timed(
    pkg: &Package,
    index: usize,
    phases: &mut LoadPhases,
) -> Result<LoadedLayer> {
    let t = Instant::now();
    let (bytes, graph) = pkg.read_layer(index)?;
    // The graph shares the buffer; once it is gone the buffer converts without a copy.
    drop(graph);
    phases.read += t.elapsed();
    let model = optimised(Vec::from(bytes), phases)
        .with_context(|| format!("{}: layer {index}", pkg.name()))?;
    let t = Instant::now();
    let plan = Plan::from_model(model).with_context(|| format!("{}: layer {index}", pkg.name()))?;
    phases.plan += t.elapsed();
    Ok(LoadedLayer { index, plan })
}

pub(super) fn to_tvalue(t: &FloatTensor) -> Result<TValue> {
    Ok(Tensor::from_shape(&t.shape, &t.data)?.into_tvalue())
}

pub(super) fn from_tvalue(v: &TValue) -> Result<FloatTensor> {
    let view = v.try_as_plain_ram()?;
    let data = view
        .as_slice::<f32>()
        .context("model output is not float32")?
        .to_vec();
    FloatTensor::new(v.shape().to_vec(), data)
}
