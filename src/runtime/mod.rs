//! Running packages: tract plans for layers and whole models, and layer-by-layer execution.

pub(crate) mod batch;
mod engine;
pub(crate) mod executor;
pub mod npy;
mod recipe;
pub mod reload;
mod residency;
pub(crate) mod scheduler;
mod sequential;
pub(crate) mod tasks;

pub use batch::{BatchOptions, BatchReport, InferenceRecord, Job, run_batch};
pub use engine::{LoadPhases, LoadedLayer, Plan, load_layer, load_layer_timed};
pub(crate) use executor::{Executor, ExecutorOptions, InferenceOutput, InferenceTiming, WholeRun};
pub use executor::{ExecutorSnapshot, ModelResidency};
pub use reload::{LayerTemplate, load_with_template, reload};
pub use residency::{Evicted, Eviction, LayerCache};
pub(crate) use scheduler::MAX_PARALLEL;
pub use scheduler::{
    CacheStats, Decision, LayerKey, ModelId, Refusal, Scheduler, SchedulerOptions,
    SchedulingPolicy, TaskRef,
};
pub(crate) use sequential::Walk;
pub use sequential::{
    Activations, RunResult, RunStats, held_bytes, run_layers_preloaded, run_layerwise, run_whole,
};
pub use tasks::{LayerCost, LoadingPolicy};

use anyhow::{Result, ensure};

/// A dense float32 tensor in C order: what goes into and comes out of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatTensor {
    /// Its shape; the product of its dimensions is `data.len()`.
    pub shape: Vec<usize>,
    /// Its values, in C order.
    pub data: Vec<f32>,
}

impl FloatTensor {
    /// A tensor of `shape` holding `data`; fails when their sizes disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<FloatTensor> {
        ensure!(
            shape.iter().product::<usize>() == data.len(),
            "shape {:?} does not hold {} values",
            shape,
            data.len()
        );
        Ok(FloatTensor { shape, data })
    }

    /// A tensor of `shape` with every value `value`.
    pub fn filled(shape: Vec<usize>, value: f32) -> FloatTensor {
        let n = shape.iter().product();
        FloatTensor {
            shape,
            data: vec![value; n],
        }
    }

    /// True when both have the same shape and the very same bits in every value.
    pub fn bit_identical(&self, other: &FloatTensor) -> bool {
        self.shape == other.shape
            && self
                .data
                .iter()
                .zip(&other.data)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

impl From<npy::Array> for FloatTensor {
    fn from(a: npy::Array) -> FloatTensor {
        FloatTensor {
            shape: a.shape,
            data: a.data,
        }
    }
}
