//! The status quo the paper and the bench compare against: every model run whole in
//! tract, one inference after another (`memaflow batch --status-quo`).

use crate::memory;
use crate::runtime::{FloatTensor, Job, run_whole};
use anyhow::{Context, Result};
use std::time::Instant;

#[derive(Debug, serde::Serialize)]
pub(crate) struct StatusQuoInference {
    pub model: String,
    pub(crate) start_ms: f64,
    pub(crate) end_ms: f64,
}

/// The same headline fields as a layer-wise `BatchReport` (`makespan_ms`, `peak_rss`),
/// so that the bench reads either report the same way.
#[derive(Debug, serde::Serialize)]
pub(crate) struct StatusQuoReport {
    pub mode: &'static str,
    pub makespan_ms: f64,
    pub peak_rss: u64,
    pub inferences: Vec<StatusQuoInference>,
    #[serde(skip)]
    pub outputs: Vec<Vec<FloatTensor>>,
}

/// Runs the jobs in order, each as one whole tract model (loaded, run, dropped), timed
/// like a batch: from before the first load to after the last output.
pub fn run(jobs: &[Job]) -> Result<StatusQuoReport> {
    let t0 = Instant::now();
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    let mut inferences = vec![];
    let mut outputs = vec![];
    for (k, job) in jobs.iter().enumerate() {
        let start = Instant::now();
        let run = run_whole(&job.package, &job.input)
            .with_context(|| format!("inference {k} ({}) run whole", job.package.name()))?;
        inferences.push(StatusQuoInference {
            model: job.package.name().to_string(),
            start_ms: ms(start),
            end_ms: ms(Instant::now()),
        });
        outputs.push(run.outputs);
    }
    Ok(StatusQuoReport {
        mode: "status-quo",
        makespan_ms: ms(Instant::now()),
        peak_rss: memory::process_memory().map(|m| m.peak_rss).unwrap_or(0),
        inferences,
        outputs,
    })
}
