//! SVG plots of a bench's records, after the paper's figures: mean makespan per
//! combination and parallelism at each memory level (Figures 7 and 8), makespan against
//! the layers a batch executes (Figure 9), speed-up and peak RSS against the memory level.

use super::child::Status;
use super::plan::{Combo, MemoryLevel};
use super::report::{ComboKey, RunRecord, group, mean, speedup_table};
use anyhow::{Result, anyhow};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn plot_error<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {}: {e:?}", path.display())
}

/// A chart with f64 coordinates on both axes, drawn into an SVG file.
type LineChart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Series `k` of a line chart: a line through `pts` in the palette's `k`th colour with a
/// dot on each point, under `label` in the legend.
fn draw_line<'a, 'b: 'a>(
    chart: &mut LineChart<'a, 'b>,
    k: usize,
    label: String,
    pts: Vec<(f64, f64)>,
    path: &Path,
) -> Result<()> {
    let err = plot_error(path);
    let color = Palette99::pick(k).to_rgba();
    chart
        .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
        .map_err(&err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    chart
        .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
        .map_err(&err)?;
    Ok(())
}

/// The legend of a line chart (upper left), and the file written.
fn finish_lines<'a, 'b: 'a>(
    chart: &mut LineChart<'a, 'b>,
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    path: &Path,
) -> Result<()> {
    let err = plot_error(path);
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 11))
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

/// A chart on `root` (filled white) whose x axis is the memory levels, one category per
/// label at 0, 1, …, and whose y axis runs from 0 to `ymax`.
fn level_chart<'a, 'b: 'a>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    caption: &str,
    labels: &[String],
    ymax: f64,
    y_desc: &str,
    path: &Path,
) -> Result<LineChart<'a, 'b>> {
    let err = plot_error(path);
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.3f64..(labels.len() as f64 - 0.7), 0f64..ymax)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_labels(labels.len() * 2 + 1)
        .x_label_formatter(&|x| category(labels, *x))
        .x_desc("memory level")
        .y_desc(y_desc)
        .draw()
        .map_err(&err)?;
    Ok(chart)
}

/// Labels for a categorical axis drawn on f64 coordinates: the category at each integer,
/// nothing between.
fn category(labels: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    labels.get(i as usize).cloned().unwrap_or_default()
}

/// Writes every plot into `dir`; returns their paths.
pub fn write_all(
    records: &[RunRecord],
    levels: &[MemoryLevel],
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    for &level in levels {
        let path = dir.join(format!("makespan-{level}.svg"));
        makespan_bars(records, level, &path)?;
        out.push(path);
        let path = dir.join(format!("layers-{level}.svg"));
        makespan_by_layers(records, level, &path)?;
        out.push(path);
    }
    let path = dir.join("speedup.svg");
    speedup_by_memory(records, levels, &path)?;
    out.push(path);
    let path = dir.join("peak-rss.svg");
    peak_rss_by_memory(records, levels, &path)?;
    out.push(path);
    Ok(out)
}

fn combos_of(records: &[RunRecord]) -> Vec<Combo> {
    let mut c: Vec<ComboKey> = records.iter().map(|r| ComboKey(r.combo)).collect();
    c.sort();
    c.dedup();
    c.into_iter().map(|k| k.0).collect()
}

fn parallels_of(records: &[RunRecord]) -> Vec<usize> {
    let mut p: Vec<usize> = records.iter().map(|r| r.parallel).collect();
    p.sort_unstable();
    p.dedup();
    p
}

/// Figures 7/8: at one memory level, one group of bars per combination, one bar per
/// parallelism, height = mean makespan over its workloads' means. A combination none of
/// whose runs finished gets an "OOM"/"failed" mark instead of a bar.
fn makespan_bars(records: &[RunRecord], level: MemoryLevel, path: &Path) -> Result<()> {
    let here: Vec<&RunRecord> = records.iter().filter(|r| r.memory == level).collect();
    let combos = combos_of(records);
    let parallels = parallels_of(records);
    // (combo, parallel) → per-workload mean makespans (s), and whether any was OOM-killed.
    let mut bars: BTreeMap<(usize, usize), (Vec<f64>, usize, usize)> = BTreeMap::new();
    for r in &here {
        let c = combos.iter().position(|c| *c == r.combo).unwrap_or(0);
        let p = parallels.iter().position(|p| *p == r.parallel).unwrap_or(0);
        let e = bars.entry((c, p)).or_default();
        match r.status {
            Status::Ok => e.0.extend(r.makespan_ms.map(|m| m / 1e3)),
            Status::OomKilled => e.1 += 1,
            _ => e.2 += 1,
        }
    }
    let ymax = bars
        .values()
        .filter_map(|(v, _, _)| mean(v))
        .fold(0.0f64, f64::max)
        .max(0.1)
        * 1.35;
    let labels: Vec<String> = combos.iter().map(|c| c.to_string()).collect();
    let err = plot_error(path);
    let root = SVGBackend::new(path, (160 + 100 * combos.len() as u32, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Mean makespan at memory {level} (bars: parallelism)"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(combos.len() as f64 - 0.5), 0f64..ymax)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .disable_x_mesh()
        .x_labels(combos.len() * 2 + 1)
        .x_label_formatter(&|x| category(&labels, *x))
        .x_label_style(("sans-serif", 11))
        .y_desc("makespan (s)")
        .draw()
        .map_err(&err)?;
    let width = 0.8 / parallels.len().max(1) as f64;
    for (pi, p) in parallels.iter().enumerate() {
        let color = Palette99::pick(pi).to_rgba();
        let rects: Vec<Rectangle<(f64, f64)>> = bars
            .iter()
            .filter(|((_, bp), _)| *bp == pi)
            .filter_map(|((c, _), (v, _, _))| {
                let x0 = *c as f64 - 0.4 + width * pi as f64;
                mean(v).map(|m| Rectangle::new([(x0, 0.0), (x0 + width, m)], color.filled()))
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(&err)?
            .label(format!("parallel {p}"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        let marks: Vec<Text<(f64, f64), String>> = bars
            .iter()
            .filter(|((_, bp), (v, _, _))| *bp == pi && v.is_empty())
            .map(|((c, _), (_, oom, _))| {
                let x0 = *c as f64 - 0.4 + width * pi as f64;
                let what = if *oom > 0 { "OOM" } else { "failed" };
                Text::new(
                    what.to_string(),
                    (x0, ymax * 0.03),
                    ("sans-serif", 11).into_font().color(&RED),
                )
            })
            .collect();
        chart.draw_series(marks).map_err(&err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

/// Figure 9: makespan against the number of layers a batch executes, one line per
/// combination and parallelism, at one memory level.
fn makespan_by_layers(records: &[RunRecord], level: MemoryLevel, path: &Path) -> Result<()> {
    let mut lines: BTreeMap<(ComboKey, usize), BTreeMap<usize, Vec<f64>>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.memory == level) {
        if let (Status::Ok, Some(m)) = (r.status, r.makespan_ms) {
            lines
                .entry((ComboKey(r.combo), r.parallel))
                .or_default()
                .entry(r.layers)
                .or_default()
                .push(m / 1e3);
        }
    }
    let xmax = records.iter().map(|r| r.layers).max().unwrap_or(1) as f64 * 1.05;
    let xmin = records.iter().map(|r| r.layers).min().unwrap_or(0) as f64 * 0.9;
    let ymax = lines
        .values()
        .flat_map(|l| l.values().filter_map(|v| mean(v)))
        .fold(0.0f64, f64::max)
        .max(0.1)
        * 1.1;
    let err = plot_error(path);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Makespan by layers executed at memory {level} (finished runs)"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(xmin..xmax, 0f64..ymax)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("layers executed by the batch")
        .y_desc("makespan (s)")
        .draw()
        .map_err(&err)?;
    for (k, ((ComboKey(combo), p), points)) in lines.iter().enumerate() {
        let pts: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|(x, v)| mean(v).map(|m| (*x as f64, m)))
            .collect();
        draw_line(&mut chart, k, format!("{combo} p{p}"), pts, path)?;
    }
    finish_lines(&mut chart, &root, path)
}

/// Speed-up relative to bulk+fcfs (the table's values) against the memory level, one line
/// per combination; a level where it has no value breaks its line.
fn speedup_by_memory(records: &[RunRecord], levels: &[MemoryLevel], path: &Path) -> Result<()> {
    let table = speedup_table(records, levels, None);
    let labels: Vec<String> = levels.iter().map(|l| l.to_string()).collect();
    let ymax = table
        .rows
        .iter()
        .flat_map(|(_, cells)| cells.iter().filter_map(|c| c.value()))
        .fold(1.0f64, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    let mut chart = level_chart(
        &root,
        "Speed-up relative to bulk+fcfs by memory level",
        &labels,
        ymax,
        "speed-up (×)",
        path,
    )?;
    for (k, (combo, cells)) in table.rows.iter().enumerate() {
        let pts: Vec<(f64, f64)> = cells
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.value().map(|v| (i as f64, v)))
            .collect();
        if !pts.is_empty() {
            draw_line(&mut chart, k, combo.to_string(), pts, path)?;
        }
    }
    finish_lines(&mut chart, &root, path)
}

/// Mean peak RSS of finished runs per combination against the memory level, with the
/// limit itself drawn as a dashed line.
fn peak_rss_by_memory(records: &[RunRecord], levels: &[MemoryLevel], path: &Path) -> Result<()> {
    let labels: Vec<String> = levels.iter().map(|l| l.to_string()).collect();
    let groups = group(records);
    let mut series: BTreeMap<ComboKey, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, level) in levels.iter().enumerate() {
        let mut per_combo: BTreeMap<ComboKey, Vec<f64>> = BTreeMap::new();
        for ((l, _, _), g) in &groups {
            if l != level {
                continue;
            }
            for (c, o) in g {
                per_combo
                    .entry(*c)
                    .or_default()
                    .extend(o.peak_rss.iter().map(|&b| b as f64 / 1048576.0));
            }
        }
        for (c, v) in per_combo {
            if let Some(m) = mean(&v) {
                series.entry(c).or_default().push((i as f64, m));
            }
        }
    }
    let limits: Vec<(f64, f64)> = levels
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.bytes().map(|b| (i as f64, b as f64 / 1048576.0)))
        .collect();
    let ymax = series
        .values()
        .flatten()
        .chain(&limits)
        .map(|p| p.1)
        .fold(1.0f64, f64::max)
        * 1.15;
    let err = plot_error(path);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    let mut chart = level_chart(
        &root,
        "Peak RSS of finished runs by memory level",
        &labels,
        ymax,
        "peak RSS (MiB)",
        path,
    )?;
    if !limits.is_empty() {
        chart
            .draw_series(limits.iter().map(|&(x, y)| {
                PathElement::new(vec![(x - 0.25, y), (x + 0.25, y)], BLACK.stroke_width(2))
            }))
            .map_err(&err)?
            .label("limit")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(2)));
    }
    for (k, (ComboKey(combo), pts)) in series.iter().enumerate() {
        draw_line(&mut chart, k, combo.to_string(), pts.clone(), path)?;
    }
    finish_lines(&mut chart, &root, path)
}
