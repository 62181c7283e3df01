//! The configuration with the lowest predicted latency whose predicted peak fits a budget.
//!
//! Steps are independent in the predictor (a step's peak depends on its own range and
//! grid and on which activations cross it, not on how other layers are grouped), so for a
//! given choice of group ranges the best grid of each group is chosen on its own: the
//! search enumerates every set of up to `max_groups` disjoint tileable ranges (the number
//! of sets grows as the number of ranges to that power: 2 is MAFAT's choice), and per
//! range every grid up to `max_grid × max_grid`; each layer outside the groups runs whole
//! or in up to `max_slices` output-channel slices, whichever is fastest within the budget.

use super::predictor::{CALIBRATION, Estimate, Predictor};
use super::{GroupConfig, TilingConfig};
use crate::model::Package;
use anyhow::{Result, bail};
use std::ops::Range;

/// The configurations [`search`] considers.
#[derive(Clone, Copy, Debug)]
pub struct Space {
    /// Most groups of one configuration (0: no groups, only channel slices).
    pub max_groups: usize,
    /// Largest number of tile rows (and of columns) of a group.
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

/// What [`search`] found: the fastest configuration predicted to fit.
#[derive(Clone, Debug)]
pub struct Choice {
    /// The configuration.
    pub config: TilingConfig,
    /// Its prediction.
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
pub fn search(model: &Predictor, budget: u64, space: Space) -> Result<Choice> {
    let n = model.layer_count();
    let layers = (0..n)
        .map(|i| model.layer_estimate(i))
        .collect::<Result<Vec<_>>>()?;
    let untiled = layers.iter().fold(Estimate::default(), |a, &b| a.then(b));
    let mut considered = 1;
    let outside = outside_choices(model, &layers, budget, space.max_slices, &mut considered);
    let ranges = range_choices(model, budget, space.max_grid, &mut considered);
    let mut sets = Sets {
        layers: n,
        outside: &outside,
        budget,
        winner: None,
        lowest_peak: untiled.peak_bytes,
    };
    sets.extend(&ranges, &mut vec![], space.max_groups);
    match sets.winner {
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
            crate::memory::Bytes(sets.lowest_peak)
        ),
    }
}

/// How each layer runs outside groups: (slices, estimate), the fastest that fits, or else
/// the lowest peak; 1 slice is the whole layer.
fn outside_choices(
    model: &Predictor,
    layers: &[Estimate],
    budget: u64,
    max_slices: usize,
    considered: &mut usize,
) -> Vec<(usize, Estimate)> {
    layers
        .iter()
        .enumerate()
        .map(|(l, &whole)| {
            let mut options = vec![(1, whole)];
            for k in 2..=max_slices {
                if let Ok(e) = model.sliced_estimate(l, k) {
                    options.push((k, e));
                }
            }
            *considered += options.len() - 1;
            let fastest = options
                .iter()
                .filter(|o| o.1.peak_bytes <= budget)
                .min_by(|a, b| better(&a.1, &b.1));
            let lowest = options.iter().min_by_key(|o| o.1.peak_bytes);
            *fastest.or(lowest).expect("the whole layer is an option")
        })
        .collect()
}

/// Every tileable range, in order of (start, end), with its fastest grid within the
/// budget and its lowest-peak grid.
fn range_choices(
    model: &Predictor,
    budget: u64,
    max_grid: usize,
    considered: &mut usize,
) -> Vec<RangeChoice> {
    let n = model.layer_count();
    let mut ranges = vec![];
    for start in 0..n {
        for end in start + 1..=n {
            let range = start..end;
            let Ok(group) = model.group(&range) else {
                continue;
            };
            // Ranges that cannot fit at any grid never join a fitting configuration: not
            // tiling them is most of a search that finds nothing (hand_landmark_full at
            // a quarter of the working set: 23 s at start-up, 2 s without). The winner
            // is the same: every grid of such a range peaks above the floor.
            if model.group_floor(&group, &range) > budget {
                continue;
            }
            let mut fastest: Option<Grid> = None;
            let mut lowest: Option<Grid> = None;
            for rows in 1..=max_grid {
                for cols in 1..=max_grid {
                    let Ok(e) = model.group_estimate_of(&group, &range, rows, cols) else {
                        continue;
                    };
                    *considered += 1;
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
    ranges
}

/// The sets of disjoint ranges tiled as groups, and the best configuration among them.
struct Sets<'a> {
    layers: usize,
    outside: &'a [(usize, Estimate)],
    budget: u64,
    winner: Option<(TilingConfig, Estimate)>,
    /// The lowest predicted peak of any set, each group at its lowest-peak grid.
    lowest_peak: u64,
}

impl<'a> Sets<'a> {
    /// Considers `chosen`, then every set that adds up to `max_groups` ranges after its
    /// last one, in order (ties go to the set considered first).
    fn extend(
        &mut self,
        ranges: &'a [RangeChoice],
        chosen: &mut Vec<&'a RangeChoice>,
        max_groups: usize,
    ) {
        self.consider(chosen);
        if chosen.len() >= max_groups {
            return;
        }
        let after = chosen.last().map_or(0, |g| g.range.end);
        for r in ranges.iter().filter(|r| r.range.start >= after) {
            chosen.push(r);
            self.extend(ranges, chosen, max_groups);
            chosen.pop();
        }
    }

    /// The configuration of `groups` (each at its fastest grid) with the other layers as
    /// `outside` says; kept if it fits and beats the winner so far.
    fn consider(&mut self, groups: &[&RangeChoice]) {
        let mut rest = Estimate::default();
        let mut config = TilingConfig::default();
        let mut next = 0;
        let spans = groups.iter().map(|g| (g.range.start, g.range.end));
        for (start, end) in spans.chain([(self.layers, self.layers)]) {
            for (l, &(slices, e)) in self.outside.iter().enumerate().take(start).skip(next) {
                rest = rest.then(e);
                if slices > 1 {
                    config.slices.insert(l, slices);
                }
            }
            next = end;
        }
        let low = groups.iter().fold(rest, |a, g| a.then(g.lowest.2));
        self.lowest_peak = self.lowest_peak.min(low.peak_bytes);
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
        let wins = self
            .winner
            .as_ref()
            .is_none_or(|w| better(&est, &w.1).is_lt());
        if est.peak_bytes <= self.budget && wins {
            self.winner = Some((config, est));
        }
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
pub(crate) fn for_inference(
    pkg: &Package,
    budget: Option<u64>,
    auto: bool,
) -> Result<Option<TilingConfig>> {
    let Some(budget) = budget else {
        bail!("--tiling auto needs --budget");
    };
    let model = Predictor::new(pkg, CALIBRATION)?;
    if !auto && model.predict(&TilingConfig::untiled())?.peak_bytes <= budget {
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
