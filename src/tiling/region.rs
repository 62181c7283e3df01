//! Receptive-field arithmetic along one spatial axis: which input rows (or columns) an
//! output range of a sliding-window op reads, and how much of the original padding a tile
//! of it sees. Pure integer arithmetic; everything else in tiling is built on it.

use crate::model::graph::Padding;
use anyhow::{Result, ensure};

/// A half-open range `[start, end)` along one axis, in the coordinates of the whole
/// (untiled) feature map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        debug_assert!(start <= end);
        Span { start, end }
    }

    pub fn len(self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(self) -> bool {
        self.start == self.end
    }

    /// The smallest span holding both.
    pub(crate) fn hull(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

/// What an output span of a window op reads: a span of its input that lies inside the
/// feature map, and the padding the op adds around it (non-zero only at the map's borders).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Need {
    pub(crate) span: Span,
    pub(crate) pad_before: usize,
    pub(crate) pad_after: usize,
}

/// One axis of a sliding-window op (convolution or pool) as the untiled model runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) kernel: usize,
    pub stride: usize,
    pub dilation: usize,
    /// Input extent of the untiled op.
    pub input: usize,
    /// Padding the untiled op adds before the first input element.
    pub(crate) pad_before: usize,
    pub output: usize,
}

impl Window {
    /// TFLite's geometry: SAME pads `max((out-1)·s + eff - n, 0)` in total, the odd element
    /// after (bottom/right); VALID pads nothing.
    pub fn new(
        input: usize,
        kernel: usize,
        stride: usize,
        dilation: usize,
        padding: Padding,
    ) -> Result<Window> {
        ensure!(
            kernel > 0 && stride > 0 && dilation > 0 && input > 0,
            "zero kernel, stride, dilation or input extent"
        );
        let eff = (kernel - 1) * dilation + 1;
        let (output, pad_before) = match padding {
            Padding::Same => {
                let out = input.div_ceil(stride);
                let total = ((out - 1) * stride + eff).saturating_sub(input);
                (out, total / 2)
            }
            Padding::Valid => {
                ensure!(input >= eff, "window {eff} larger than input {input}");
                ((input - eff) / stride + 1, 0)
            }
        };
        Ok(Window {
            kernel,
            stride,
            dilation,
            input,
            pad_before,
            output,
        })
    }

    fn effective(&self) -> usize {
        (self.kernel - 1) * self.dilation + 1
    }

    /// The input an output span reads. With the returned padding around it, a VALID window
    /// of the same kernel, stride and dilation yields exactly `out.len()` outputs, equal to
    /// the untiled op's outputs `out`.
    pub(crate) fn needs(&self, out: Span) -> Result<Need> {
        ensure!(
            !out.is_empty() && out.end <= self.output,
            "output span {}..{} outside 0..{}",
            out.start,
            out.end,
            self.output
        );
        // In padded coordinates the window of output o starts at o·s.
        let lo = (out.start * self.stride) as i64 - self.pad_before as i64;
        let hi = ((out.end - 1) * self.stride + self.effective()) as i64 - self.pad_before as i64;
        let n = self.input as i64;
        let span = Span::new(lo.clamp(0, n) as usize, hi.clamp(0, n) as usize);
        ensure!(
            !span.is_empty(),
            "output span {}..{} reads only padding",
            out.start,
            out.end
        );
        Ok(Need {
            span,
            pad_before: (-lo).max(0) as usize,
            pad_after: (hi - n).max(0) as usize,
        })
    }
}

/// Splits an extent into `parts` consecutive spans of `ceil(extent/parts)`, the last one
/// shorter: all but the last tile then share one size, which keeps distinct tile shapes
/// (and so tract plans) few.
pub fn split(extent: usize, parts: usize) -> Result<Vec<Span>> {
    ensure!(parts > 0, "a grid needs at least one tile per axis");
    let size = extent.div_ceil(parts);
    let spans: Vec<Span> = (0..parts)
        .map(|i| Span::new((i * size).min(extent), ((i + 1) * size).min(extent)))
        .collect();
    ensure!(
        spans.iter().all(|s| !s.is_empty()),
        "{parts} tiles of {size} do not fit an extent of {extent} without empty tiles"
    );
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The untiled op on a 1-D signal, by definition: output o is the sum of the padded
    /// input at o·s + k·d; padding reads as `None`.
    fn reference_windows(w: &Window) -> Vec<Vec<Option<usize>>> {
        (0..w.output)
            .map(|o| {
                (0..w.kernel)
                    .map(|k| {
                        let p = (o * w.stride + k * w.dilation) as i64 - w.pad_before as i64;
                        (0..w.input as i64).contains(&p).then_some(p as usize)
                    })
                    .collect()
            })
            .collect()
    }

    /// Every output span of every window geometry reads, through `needs`, exactly the input
    /// elements (and padding positions) the untiled op reads.
    #[test]
    fn needs_matches_the_definition_of_a_window() {
        for padding in [Padding::Same, Padding::Valid] {
            for input in 1..=13 {
                for kernel in 1..=5 {
                    for stride in 1..=3 {
                        for dilation in 1..=2 {
                            let Ok(w) = Window::new(input, kernel, stride, dilation, padding)
                            else {
                                continue;
                            };
                            let want = reference_windows(&w);
                            for a in 0..w.output {
                                for b in a + 1..=w.output {
                                    check_span(&w, &want, Span::new(a, b));
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn check_span(w: &Window, want: &[Vec<Option<usize>>], out: Span) {
        let Ok(need) = w.needs(out) else {
            // Only a span reading nothing but padding may be refused.
            assert!(
                want[out.start..out.end]
                    .iter()
                    .flatten()
                    .all(|p| p.is_none()),
                "{w:?} {out:?}"
            );
            return;
        };
        let len = need.pad_before + need.span.len() + need.pad_after;
        let eff = (w.kernel - 1) * w.dilation + 1;
        assert!(len >= eff, "{w:?} {out:?} {need:?}");
        assert_eq!(
            (len - eff) / w.stride + 1,
            out.len(),
            "{w:?} {out:?} {need:?}"
        );
        for (i, o) in (out.start..out.end).enumerate() {
            for (k, &expected) in want[o].iter().enumerate() {
                let p = (i * w.stride + k * w.dilation) as i64 - need.pad_before as i64;
                let got = (0..need.span.len() as i64)
                    .contains(&p)
                    .then(|| need.span.start + p as usize);
                assert_eq!(got, expected, "{w:?} {out:?} {need:?} o={o} k={k}");
            }
        }
    }

    #[test]
    fn same_padding_puts_the_odd_element_after() {
        // 4 inputs, k=3, s=2: out 2, total pad (1·2+3)-4 = 1, all of it after.
        let w = Window::new(4, 3, 2, 1, Padding::Same).unwrap();
        assert_eq!((w.output, w.pad_before), (2, 0));
        let need = w.needs(Span::new(1, 2)).unwrap();
        assert_eq!(
            (need.span, need.pad_before, need.pad_after),
            (Span::new(2, 4), 0, 1)
        );
        // k=3, s=1 on 5: one before, one after.
        let w = Window::new(5, 3, 1, 1, Padding::Same).unwrap();
        assert_eq!(w.pad_before, 1);
        let inner = w.needs(Span::new(1, 4)).unwrap();
        assert_eq!(
            (inner.span, inner.pad_before, inner.pad_after),
            (Span::new(0, 5), 0, 0)
        );
        let top = w.needs(Span::new(0, 2)).unwrap();
        assert_eq!(
            (top.span, top.pad_before, top.pad_after),
            (Span::new(0, 3), 1, 0)
        );
    }

    #[test]
    fn dilation_widens_the_halo() {
        let w = Window::new(20, 3, 1, 2, Padding::Same).unwrap();
        assert_eq!(w.pad_before, 2);
        let need = w.needs(Span::new(5, 10)).unwrap();
        assert_eq!(
            (need.span, need.pad_before, need.pad_after),
            (Span::new(3, 12), 0, 0)
        );
    }

    #[test]
    fn valid_pool_of_stride_two_reads_disjoint_pairs() {
        let w = Window::new(9, 2, 2, 1, Padding::Valid).unwrap();
        assert_eq!(w.output, 4);
        let need = w.needs(Span::new(1, 3)).unwrap();
        assert_eq!(
            (need.span, need.pad_before, need.pad_after),
            (Span::new(2, 6), 0, 0)
        );
    }

    #[test]
    fn out_of_range_spans_are_errors() {
        let w = Window::new(8, 3, 1, 1, Padding::Same).unwrap();
        assert!(w.needs(Span::new(0, 9)).is_err());
        assert!(w.needs(Span::new(3, 3)).is_err());
        assert!(Window::new(2, 3, 1, 1, Padding::Valid).is_err());
        assert!(Window::new(8, 3, 0, 1, Padding::Same).is_err());
    }

    #[test]
    fn split_covers_the_extent_with_equal_tiles_but_the_last() {
        assert_eq!(
            split(26, 3).unwrap(),
            vec![Span::new(0, 9), Span::new(9, 18), Span::new(18, 26)]
        );
        assert_eq!(split(7, 7).unwrap().len(), 7);
        for extent in 1..40 {
            for parts in 1..=8 {
                if let Ok(spans) = split(extent, parts) {
                    assert_eq!(spans.len(), parts);
                    assert_eq!(spans[0].start, 0);
                    assert_eq!(spans[parts - 1].end, extent);
                    assert!(spans.windows(2).all(|p| p[0].end == p[1].start));
                }
            }
        }
        // 5 in 4 parts of 2: the fourth would be empty.
        assert!(split(5, 4).is_err());
        assert!(split(3, 4).is_err());
        assert!(split(3, 0).is_err());
    }
}
