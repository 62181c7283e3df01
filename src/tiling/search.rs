//! The configuration with the lowest predicted latency whose predicted peak fits a budget.
//!
//! Steps are independent in the predictor (a step's peak depends on its own range and
//! grid and on which activations cross it, not on how other layers are grouped), so for a
//! given choice of group ranges the best grid of each group is chosen on its own: the
//! search enumerates every set of up to `max_groups` disjoint tileable ranges, and per
//! range every grid up to `max_grid × max_grid`; each layer outside the groups runs whole
//! or in up to `max_slices` output-channel slices, whichever is fastest within the budget.

use super::predictor::{CALIBRATION, Estimate, Model};
use super::{Config, GroupConfig};
use crate::model::Package;
use anyhow::{Result, bail};
use std::ops::Range;

#[derive(Clone, Copy, Debug)]
pub struct Space {
    pub max_groups: usize,
    pub max_grid: usize,
    /// Most output-channel slices of an untiled layer (1: never slice).
    pub max_slices: usize,
}

impl Default for Space {
    /// MAFAT's space, one or two groups of early layers with grids up to 8×8, and the
    /// other layers whole or in up to 4 channel slices.
    fn default() -> Space {
        Space {
            max_groups: 2,
            max_grid: 8,
            max_slices: 4,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Choice {
    pub config: Config,
    pub estimate: Estimate,
    /// The untiled run's prediction, for comparison.
    pub untiled: Estimate,
    /// Configurations whose prediction was compared.
    pub considered: usize,
}

/// A grid of one range and its prediction.
type Grid = (usize, usize, Estimate);

/// A tileable range: its fastest grid within the budget, and its lowest-peak grid.
struct RangeChoice {
    range: Range<usize>,
    fastest: Option<Grid>,
    lowest: Grid,
}

/// The fastest configuration predicted to fit `budget`, or an error naming the lowest
/// peak the search could reach.
pub fn search(model: &Model, budget: u64, space: Space) -> Result<Choice> {
    let n = model.layer_count();
    let layers = (0..n)
        .map(|i| model.layer_estimate(i))
        .collect::<Result<Vec<_>>>()?;
    let untiled = layers.iter().fold(Estimate::default(), |a, &b| a.then(b));
    // How each layer runs outside groups: (slices, estimate), the fastest that fits, or
    // else the lowest peak; 1 slice is the whole layer.
    let mut considered = 1;
    let outside: Vec<(usize, Estimate)> = (0..n)
        .map(|l| {
            let mut options = vec![(1, layers[l])];
            for k in 2..=space.max_slices {
                if let Ok(e) = model.sliced_estimate(l, k) {
                    options.push((k, e));
                }
            }
            considered += options.len() - 1;
            let fastest = options
                .iter()
                .filter(|o| o.1.peak_bytes <= budget)
                .min_by(|a, b| better(&a.1, &b.1));
            let lowest = options.iter().min_by_key(|o| o.1.peak_bytes);
            *fastest.or(lowest).expect("the whole layer is an option")
        })
        .collect();
    let mut ranges: Vec<RangeChoice> = vec![];
    for start in 0..n {
        for end in start + 1..=n {
            let range = start..end;
            if model.group(&range).is_err() {
                continue;
            }
            let mut fastest: Option<Grid> = None;
            let mut lowest: Option<Grid> = None;
            for rows in 1..=space.max_grid {
                for cols in 1..=space.max_grid {
                    let Ok(e) = model.group_estimate(&range, rows, cols) else {
                        continue;
                    };
                    considered += 1;
                    if e.peak_bytes <= budget && fastest.is_none_or(|b| better(&e, &b.2).is_lt()) {
                        fastest = Some((rows, cols, e));
                    }
                    if lowest.is_none_or(|b| e.peak_bytes < b.2.peak_bytes) {
                        lowest = Some((rows, cols, e));
                    }
                }
            }
            if let Some(lowest) = lowest {
                ranges.push(RangeChoice {
                    range,
                    fastest,
                    lowest,
                });
            }
        }
    }
    let mut winner: Option<(Config, Estimate)> = None;
    let mut lowest_peak = untiled.peak_bytes;
    let mut consider = |groups: &[&RangeChoice]| {
        let mut rest = Estimate::default();
        let mut config = Config::default();
        let mut next = 0;
        let starts = groups.iter().map(|g| (g.range.start, g.range.end));
        for (start, end) in starts.chain([(n, n)]) {
            for (l, &(slices, e)) in outside.iter().enumerate().take(start).skip(next) {
                rest = rest.then(e);
                if slices > 1 {
                    config.slices.insert(l, slices);
                }
            }
            next = end;
        }
        let low = groups.iter().fold(rest, |a, g| a.then(g.lowest.2));
        lowest_peak = lowest_peak.min(low.peak_bytes);
        let mut est = rest;
        for g in groups {
            let Some((rows, cols, e)) = g.fastest else {
                return;
            };
            est = est.then(e);
            config.groups.push(GroupConfig {
                layers: g.range.clone(),
                rows,
                cols,
            });
        }
        if est.peak_bytes <= budget && winner.as_ref().is_none_or(|w| better(&est, &w.1).is_lt()) {
            winner = Some((config, est));
        }
    };
    consider(&[]);
    for (i, a) in ranges.iter().enumerate() {
        consider(&[a]);
        if space.max_groups >= 2 {
            for b in &ranges[i + 1..] {
                if b.range.start >= a.range.end {
                    consider(&[a, b]);
                }
            }
        }
    }
    match winner {
        Some((config, estimate)) => Ok(Choice {
            config,
            estimate,
            untiled,
            considered,
        }),
        None => bail!(
            "{}: no configuration is predicted to fit {} (untiled: {}, lowest found: {})",
            model.pkg.name(),
            crate::memory::Bytes(budget),
            crate::memory::Bytes(untiled.peak_bytes),
            crate::memory::Bytes(lowest_peak)
        ),
    }
}

/// Faster first; predicted latencies within 0.5% of each other are a tie (the model is
/// not that precise), broken by the lower peak, which leaves the most room for error.
fn better(a: &Estimate, b: &Estimate) -> std::cmp::Ordering {
    if (a.secs - b.secs).abs() <= 0.005 * a.secs.min(b.secs) {
        a.peak_bytes.cmp(&b.peak_bytes)
    } else {
        a.secs.total_cmp(&b.secs)
    }
}

/// What `infer` runs: with `auto`, the search's choice for `budget`; without it, tiling
/// only when the untiled run is predicted not to fit `budget`.
pub fn for_inference(pkg: &Package, budget: Option<u64>, auto: bool) -> Result<Option<Config>> {
    let Some(budget) = budget else {
        bail!("--tiling auto needs --budget");
    };
    let model = Model::new(pkg, CALIBRATION)?;
    if !auto && model.predict(&Config::untiled())?.peak_bytes <= budget {
        return Ok(None);
    }
    let choice = search(&model, budget, Space::default())?;
    log::info!(
        "{}: tiling {} (predicted peak {}, {:.0} ms)",
        pkg.name(),
        choice.config,
        crate::memory::Bytes(choice.estimate.peak_bytes),
        choice.estimate.secs * 1e3
    );
    Ok((!choice.config.is_untiled()).then_some(choice.config))
}
