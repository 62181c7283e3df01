//! Fused tiling (MAFAT, Farley & Gerstlauer 2022): groups of consecutive conv and pool
//! layers run tile by tile, each output tile computed from the input region its receptive
//! field covers, so that the huge early activations never exist whole inside tract.
//!
//! `region` is the receptive-field arithmetic, `group` turns layers into a tileable graph
//! and a tile into its own small graph, `slice` cuts a conv layer into output-channel
//! slices, `execute` runs a package under a [`TilingConfig`], `predictor` gives a
//! configuration's peak memory and latency from shapes, `search` picks the fastest
//! configuration that fits a budget, `job` runs a package tiled inside a batch. See
//! `docs/tiling.md`.

pub mod execute;
pub mod group;
pub(crate) mod job;
pub mod predictor;
pub(crate) mod region;
pub mod search;
pub mod slice;

pub use execute::{load_group, run_tiled};
pub(crate) use job::TiledModel;

use anyhow::{Context, Result, ensure};
use std::ops::Range;

/// One fused group: package layers `layers` run as one graph, its output split into
/// `rows × cols` tiles.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupConfig {
    /// Package layers in the group.
    pub layers: Range<usize>,
    /// Tile rows of the group's output.
    pub rows: usize,
    /// Tile columns of the group's output.
    pub cols: usize,
}

/// Which layers are fused into tiled groups; every other layer runs whole, or, if listed
/// in `slices`, as that many plans over slices of its output channels (so that tract
/// never holds more than a slice of a large kernel). Groups are in layer order and do not
/// overlap.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TilingConfig {
    /// The fused groups, in layer order.
    pub groups: Vec<GroupConfig>,
    /// Untiled layer → number of output-channel slices (at least 2).
    pub slices: std::collections::BTreeMap<usize, usize>,
}

impl TilingConfig {
    /// The configuration that tiles nothing.
    pub fn untiled() -> TilingConfig {
        TilingConfig::default()
    }

    /// Whether it tiles and slices nothing.
    pub fn is_untiled(&self) -> bool {
        self.groups.is_empty() && self.slices.is_empty()
    }

    /// Checks the groups against a package of `layers` layers.
    pub fn check(&self, layers: usize) -> Result<()> {
        let mut next = 0;
        for g in &self.groups {
            ensure!(
                g.layers.start >= next && g.layers.start < g.layers.end,
                "group {} is empty, overlaps another or is out of order",
                g
            );
            ensure!(
                g.layers.end <= layers,
                "group {} goes past the last layer ({})",
                g,
                layers - 1
            );
            ensure!(g.rows > 0 && g.cols > 0, "group {} has an empty grid", g);
            next = g.layers.end;
        }
        for (&layer, &parts) in &self.slices {
            ensure!(layer < layers, "layer {layer} does not exist");
            ensure!(
                parts >= 2,
                "layer {layer} sliced into {parts}: use at least 2"
            );
            ensure!(
                !self.groups.iter().any(|g| g.layers.contains(&layer)),
                "layer {layer} is both in a group and sliced"
            );
        }
        Ok(())
    }
}

impl std::fmt::Display for GroupConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-{}:{}x{}",
            self.layers.start,
            self.layers.end - 1,
            self.rows,
            self.cols
        )
    }
}

impl std::fmt::Display for TilingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.groups.is_empty() && self.slices.is_empty() {
            return write!(f, "off");
        }
        let parts: Vec<String> = self
            .groups
            .iter()
            .map(|g| g.to_string())
            .chain(self.slices.iter().map(|(l, k)| format!("{l}/{k}")))
            .collect();
        write!(f, "{}", parts.join(","))
    }
}

impl std::str::FromStr for TilingConfig {
    type Err = anyhow::Error;

    /// `off`, or groups `FIRST-LAST:ROWSxCOLS` (layer indices inclusive) and sliced layers
    /// `LAYER/SLICES` separated by commas, e.g. `0-2:4x4,3-5:2x2,8/3`.
    fn from_str(s: &str) -> Result<TilingConfig> {
        let s = s.trim();
        if s == "off" {
            return Ok(TilingConfig::untiled());
        }
        let mut config = TilingConfig::default();
        for part in s.split(',') {
            let part = part.trim();
            let num = |v: &str, ctx: &str| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("'{part}' is not {ctx}"))
            };
            if let Some((layer, parts)) = part.split_once('/') {
                let sliced = "a sliced layer LAYER/SLICES (e.g. 8/3)";
                config
                    .slices
                    .insert(num(layer, sliced)?, num(parts, sliced)?);
                continue;
            }
            let group = "a group FIRST-LAST:ROWSxCOLS (e.g. 0-2:4x4)";
            let (layers, grid) = part
                .split_once(':')
                .with_context(|| format!("'{part}' is not {group}"))?;
            let (first, last) = layers.split_once('-').unwrap_or((layers, layers));
            let (rows, cols) = grid
                .split_once(['x', 'X'])
                .with_context(|| format!("'{part}' is not {group}"))?;
            let (first, last) = (num(first, group)?, num(last, group)?);
            ensure!(first <= last, "group '{part}' ends before it starts");
            config.groups.push(GroupConfig {
                layers: first..last + 1,
                rows: num(rows, group)?,
                cols: num(cols, group)?,
            });
        }
        config.check(usize::MAX)?;
        Ok(config)
    }
}

/// Whether and how a run uses fused tiling: `--tiling` of `infer` and `batch`, `[run]
/// tiling` of the daemon, with one meaning everywhere (docs/tiling.md). The budget is the
/// run's (`--budget`; a batch and the daemon fall back to the headroom they read).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Tiling {
    /// Never tiled. (`infer --tiling off` runs the tiled executor with no groups, the
    /// baseline a tiled run is compared with.)
    Off,
    /// Tiled only when the untiled run does not fit the budget, as the runner counts it:
    /// `infer` by the predictor's peak of the untiled run, a batch by the largest layer's
    /// cost as the scheduler reserves it. With no budget known, never.
    #[default]
    Needed,
    /// The configuration the search predicts fastest within the budget, which may tile
    /// nothing.
    Auto,
    /// This configuration: `infer` only, as it names one package's layers.
    Fixed(TilingConfig),
}

impl std::fmt::Display for Tiling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tiling::Off => write!(f, "off"),
            Tiling::Needed => write!(f, "needed"),
            Tiling::Auto => write!(f, "auto"),
            Tiling::Fixed(c) => write!(f, "{c}"),
        }
    }
}

impl std::str::FromStr for Tiling {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Tiling> {
        Ok(match s.trim() {
            "off" => Tiling::Off,
            "needed" => Tiling::Needed,
            "auto" => Tiling::Auto,
            other => Tiling::Fixed(other.parse().context(
                "tiling takes off, needed, auto, or groups FIRST-LAST:ROWSxCOLS and sliced layers LAYER/SLICES separated by commas",
            )?),
        })
    }
}

impl From<Tiling> for String {
    fn from(t: Tiling) -> String {
        t.to_string()
    }
}

impl TryFrom<String> for Tiling {
    type Error = anyhow::Error;

    fn try_from(s: String) -> Result<Tiling> {
        s.parse()
    }
}

impl Tiling {
    /// Refuses a fixed configuration where several packages share the setting.
    pub(crate) fn check_shared(&self) -> Result<()> {
        ensure!(
            !matches!(self, Tiling::Fixed(_)),
            "tiling '{self}' names one package's layers; for several models use off, needed or auto"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_and_print_back() {
        let c: TilingConfig = "0-2:4x4, 3-5:2x3".parse().unwrap();
        assert_eq!(
            c.groups,
            vec![
                GroupConfig {
                    layers: 0..3,
                    rows: 4,
                    cols: 4
                },
                GroupConfig {
                    layers: 3..6,
                    rows: 2,
                    cols: 3
                }
            ]
        );
        assert_eq!(c.to_string(), "0-2:4x4,3-5:2x3");
        let c: TilingConfig = "0-4:4x4,10/4,8/3".parse().unwrap();
        assert_eq!(c.slices, [(8, 3), (10, 4)].into_iter().collect());
        assert_eq!(c.to_string(), "0-4:4x4,8/3,10/4");
        for bad in ["8/1", "8/x", "2/2,0-3:2x2"] {
            assert!(bad.parse::<TilingConfig>().is_err(), "{bad}");
        }
        assert_eq!(
            "4:1x2".parse::<TilingConfig>().unwrap().groups[0].layers,
            4..5
        );
        assert_eq!(
            "off".parse::<TilingConfig>().unwrap(),
            TilingConfig::untiled()
        );
        for bad in [
            "0-2",
            "0-2:4",
            "2-1:2x2",
            "0-2:2x2,1-3:2x2",
            "0-2:0x2",
            "a-b:2x2",
        ] {
            assert!(bad.parse::<TilingConfig>().is_err(), "{bad}");
        }
        assert!(
            "0-12:2x2"
                .parse::<TilingConfig>()
                .unwrap()
                .check(12)
                .is_err()
        );
        assert_eq!("auto".parse::<Tiling>().unwrap(), Tiling::Auto);
        assert_eq!("off".parse::<Tiling>().unwrap(), Tiling::Off);
        assert_eq!("needed".parse::<Tiling>().unwrap(), Tiling::Needed);
        for t in ["off", "needed", "auto", "0-1:2x2,8/3"] {
            let tiling: Tiling = t.parse().unwrap();
            assert_eq!(tiling.to_string(), t);
            let json = serde_json::to_value(&tiling).unwrap();
            assert_eq!(json, serde_json::json!(t));
            assert_eq!(serde_json::from_value::<Tiling>(json).unwrap(), tiling);
        }
        assert!(Tiling::Auto.check_shared().is_ok());
        assert!(
            Tiling::Fixed(TilingConfig::untiled())
                .check_shared()
                .is_err()
        );
        assert_eq!(
            "0-1:2x2".parse::<Tiling>().unwrap(),
            Tiling::Fixed("0-1:2x2".parse().unwrap())
        );
        assert!("sometimes".parse::<Tiling>().is_err());
    }
}
