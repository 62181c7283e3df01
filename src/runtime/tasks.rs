//! The orchestrator: one inference (one input through one package) becomes Init, Load and
//! Exec tasks whose dependencies follow the loading policy (the paper's §2.1).

use crate::model::LayerKind;

/// How an inference's layers are loaded relative to their execution.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
pub enum LoadingPolicy {
    /// Every layer loaded before the first executes (the status quo of whole models).
    Bulk,
    /// Load a layer, run it, load the next: one layer resident at a time.
    Linear,
    /// DeepEye: conv layers load and run in turn on one pool while the fc layers (the bulk
    /// of the weights) preload on a second pool.
    DeepEye,
    /// After Init any load may run; exec i needs load i and exec i-1.
    Partial,
}

impl LoadingPolicy {
    /// Every policy, in the order tables and plans list them.
    pub const ALL: [LoadingPolicy; 4] = [
        LoadingPolicy::Bulk,
        LoadingPolicy::Linear,
        LoadingPolicy::DeepEye,
        LoadingPolicy::Partial,
    ];
}

/// What the scheduler knows of one layer ahead of running it.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerCost {
    /// What its weighted op is.
    pub kind: LayerKind,
    /// Resident bytes from the end of its load to the end of its exec (weights + plan).
    pub load_bytes: u64,
    /// Extra bytes only while it loads: the file's buffer and the planner's transient
    /// copies of the weights (tract repacks them), freed when the load ends.
    #[serde(default)]
    pub plan_bytes: u64,
    /// Extra bytes while it executes (activations in and out, workspace).
    pub exec_bytes: u64,
    /// Expected duration of its load, seconds.
    pub load_secs: f64,
    /// Expected duration of its exec, seconds.
    pub exec_secs: f64,
}

impl LayerCost {
    /// The most the layer ever adds: while it loads, with its exec's bytes reserved ahead.
    pub fn footprint(&self) -> u64 {
        self.load_bytes + self.plan_bytes + self.exec_bytes
    }

    /// What stays reserved between the end of its load and the end of its exec.
    pub fn loaded(&self) -> u64 {
        self.load_bytes + self.exec_bytes
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(tag = "task", content = "layer", rename_all = "lowercase")]
pub enum TaskKind {
    Init,
    Load(usize),
    Exec(usize),
}

/// A task of one inference; `deps` index the same inference's task list.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TaskSpec {
    pub kind: TaskKind,
    pub(crate) deps: Vec<usize>,
    /// Which worker pool runs it: 0, or 1 for DeepEye's fc preloads.
    pub pool: usize,
}

/// Task list layout: `[Init, Load(0..n), Exec(0..n)]`.
pub(crate) fn load_index(layer: usize) -> usize {
    1 + layer
}

pub(crate) fn exec_index(layers: usize, layer: usize) -> usize {
    1 + layers + layer
}

/// The tasks of one inference over `layers`, with dependencies for `policy`.
pub(crate) fn plan_inference(policy: LoadingPolicy, layers: &[LayerCost]) -> Vec<TaskSpec> {
    let n = layers.len();
    let mut tasks = vec![TaskSpec {
        kind: TaskKind::Init,
        deps: vec![],
        pool: 0,
    }];
    let is_fc = |i: usize| layers[i].kind == LayerKind::Fc;
    for i in 0..n {
        let (deps, pool) = match policy {
            LoadingPolicy::Bulk | LoadingPolicy::Partial => (vec![0], 0),
            LoadingPolicy::Linear => (vec![if i == 0 { 0 } else { exec_index(n, i - 1) }], 0),
            LoadingPolicy::DeepEye if is_fc(i) => (vec![0], 1),
            LoadingPolicy::DeepEye => {
                // Waits for the previous non-fc layer's exec: conv layers alternate.
                let prev = (0..i).rev().find(|&j| !is_fc(j));
                (vec![prev.map_or(0, |j| exec_index(n, j))], 0)
            }
        };
        tasks.push(TaskSpec {
            kind: TaskKind::Load(i),
            deps,
            pool,
        });
    }
    for i in 0..n {
        let mut deps = match policy {
            LoadingPolicy::Bulk => (0..n).map(load_index).collect(),
            _ => vec![load_index(i)],
        };
        if i > 0 {
            deps.push(exec_index(n, i - 1));
        }
        tasks.push(TaskSpec {
            kind: TaskKind::Exec(i),
            deps,
            pool: 0,
        });
    }
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(kinds: &[LayerKind]) -> Vec<LayerCost> {
        kinds
            .iter()
            .map(|&kind| LayerCost {
                kind,
                load_bytes: 100,
                plan_bytes: 100,
                exec_bytes: 10,
                load_secs: 0.01,
                exec_secs: 0.01,
            })
            .collect()
    }

    #[test]
    fn dependencies_follow_each_policy() {
        use LayerKind::*;
        let l = layers(&[Conv, Conv, Fc, Fc]);
        let bulk = plan_inference(LoadingPolicy::Bulk, &l);
        assert_eq!(bulk[exec_index(4, 0)].deps, vec![1, 2, 3, 4]);
        let linear = plan_inference(LoadingPolicy::Linear, &l);
        assert_eq!(linear[load_index(2)].deps, vec![exec_index(4, 1)]);
        assert_eq!(linear[load_index(0)].deps, vec![0]);
        let partial = plan_inference(LoadingPolicy::Partial, &l);
        assert_eq!(partial[load_index(3)].deps, vec![0]);
        assert_eq!(
            partial[exec_index(4, 3)].deps,
            vec![load_index(3), exec_index(4, 2)]
        );
        let deepeye = plan_inference(LoadingPolicy::DeepEye, &l);
        assert_eq!(
            (
                deepeye[load_index(2)].deps.clone(),
                deepeye[load_index(2)].pool
            ),
            (vec![0], 1)
        );
        assert_eq!(deepeye[load_index(1)].deps, vec![exec_index(4, 0)]);
        for plan in [bulk, linear, partial, deepeye] {
            assert_eq!(plan.len(), 1 + 2 * 4);
            // Every dependency points at an earlier task: the lists are topologically ordered
            // except linear/deepeye loads, which point at execs; no task depends on itself.
            for (i, t) in plan.iter().enumerate() {
                assert!(t.deps.iter().all(|&d| d != i && d < plan.len()));
            }
        }
    }
}
