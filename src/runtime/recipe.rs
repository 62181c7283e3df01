//! Where each value of an optimised plan's weight tensor comes from: a gather map from the
//! layer's weights, compressed into strided blocks. tract's codegen only moves weights
//! (reshapes, transposes, packing into panels, zero padding), so a packed kernel is a few
//! nested strided copies of the file's values; replaying them is what makes a reload cheap
//! (`runtime/reload.rs`).

use anyhow::{Result, ensure};

/// Weight values are tagged with codes `CODE_BASE + index` before tract plans a layer:
/// every integer in [2^23, 2^24) is exact in f32, so a tag survives any copy and cannot be
/// confused with an arithmetic result of another tag except by an exact integer, which the
/// verification of each template then catches.
pub(super) const CODE_BASE: f32 = 8_388_608.0;

/// The most weight values a layer may have for its weights to be tagged.
pub(super) const MAX_CODES: usize = 1 << 23;

/// The tag of weight value `index`.
pub(super) fn code(index: usize) -> f32 {
    CODE_BASE + index as f32
}

fn decode(v: f32, sources: usize) -> Option<usize> {
    (v >= CODE_BASE && v < CODE_BASE + sources as f32).then_some((v - CODE_BASE) as usize)
}

/// One dimension of a block: `count` steps of `dst_step` in the output and `src_step` in
/// the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dim {
    count: usize,
    dst_step: isize,
    src_step: isize,
}

/// Three nested strided loops: enough for a matrix packed into panels (row within a
/// panel, depth, panel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Block {
    dst: usize,
    /// A weight index, or the bits of a literal value (`fill`).
    src: usize,
    fill: bool,
    dims: [Dim; 3],
}

const ONE: Dim = Dim {
    count: 1,
    dst_step: 0,
    src_step: 0,
};

/// How to rebuild one weight tensor of an optimised plan from the layer's weights.
#[derive(Clone, Debug)]
pub(super) struct Recipe {
    /// Values (f32 words) in the output.
    len: usize,
    /// Words of the layer file: a tag is the index of a weight's word in it.
    sources: usize,
    blocks: Vec<Block>,
}

impl Recipe {
    /// The recipe that turns the weights into `real`, read off `tagged` (the same tensor
    /// planned from tagged weights): a value that is a tag is gathered, any other is a
    /// literal taken from `real`. `None` when `real` and `tagged` differ in size.
    pub(super) fn decode(tagged: &[u32], real: &[u32], sources: usize) -> Option<Recipe> {
        if tagged.len() != real.len() || sources > MAX_CODES {
            return None;
        }
        let mut blocks = vec![];
        let mut j = 0;
        while j < tagged.len() {
            let start = j;
            match decode(f32::from_bits(tagged[j]), sources) {
                Some(first) => {
                    let next = |k: usize| decode(f32::from_bits(tagged[k]), sources);
                    let stride = match tagged.get(j + 1).and_then(|_| next(j + 1)) {
                        Some(second) => second as isize - first as isize,
                        None => 0,
                    };
                    j += 1;
                    while j < tagged.len()
                        && next(j)
                            == Some((first as isize + (j - start) as isize * stride) as usize)
                    {
                        j += 1;
                    }
                    blocks.push(run(start, first, j - start, stride, false));
                }
                None => {
                    let bits = real[j];
                    j += 1;
                    while j < tagged.len()
                        && decode(f32::from_bits(tagged[j]), sources).is_none()
                        && real[j] == bits
                    {
                        j += 1;
                    }
                    // Zeros are there already: outputs start zeroed.
                    if bits != 0 {
                        blocks.push(run(start, bits as usize, j - start, 0, true));
                    }
                }
            }
        }
        let blocks = nest(nest(blocks, 1), 2);
        Some(Recipe {
            len: tagged.len(),
            sources,
            blocks,
        })
    }

    pub(super) fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Bytes the recipe holds.
    pub(super) fn bytes(&self) -> u64 {
        (std::mem::size_of::<Recipe>() + self.blocks.len() * std::mem::size_of::<Block>()) as u64
    }

    /// The innermost runs, in order: `len` values from `dst` on, gathered from word `src`
    /// of the file on by `stride`, or (`fill`) all equal to the bits `src`.
    fn runs(&self) -> impl Iterator<Item = (usize, usize, usize, isize, bool)> + '_ {
        self.blocks.iter().flat_map(|b| {
            let [d0, d1, d2] = b.dims;
            (0..d2.count).flat_map(move |c| {
                (0..d1.count).map(move |r| {
                    let (c, r) = (c as isize, r as isize);
                    let dst = b.dst as isize + c * d2.dst_step + r * d1.dst_step;
                    let src = if b.fill {
                        b.src as isize
                    } else {
                        b.src as isize + c * d2.src_step + r * d1.src_step
                    };
                    (dst as usize, src as usize, d0.count, d0.src_step, b.fill)
                })
            })
        })
    }

    fn check(&self, file: &[u8], out: usize) -> Result<()> {
        ensure!(
            file.len() / 4 == self.sources && out == self.len,
            "recipe for {} values from a file of {} words applied to {} values from {}",
            self.len,
            self.sources,
            out,
            file.len() / 4
        );
        Ok(())
    }

    /// Fills `out` (zeroed, `len` values) from the layer file's bytes.
    pub(super) fn apply(&self, file: &[u8], out: &mut [f32]) -> Result<()> {
        self.check(file, out.len())?;
        // Indexed by word: one bounds check per value on the strided path, not four.
        let (words, _) = file.as_chunks::<4>();
        for (dst, src, len, stride, fill) in self.runs() {
            let out = &mut out[dst..dst + len];
            if fill {
                out.fill(f32::from_bits(src as u32));
            } else if stride == 1 {
                for (o, w) in out.iter_mut().zip(&words[src..src + len]) {
                    *o = f32::from_le_bytes(*w);
                }
            } else {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = f32::from_le_bytes(words[(src as isize + i as isize * stride) as usize]);
                }
            }
        }
        Ok(())
    }

    /// Whether applying the recipe to `file` gives exactly `real` (bits), without
    /// materialising it: every value a run writes matches, and `real` has no other
    /// non-zero value.
    pub(super) fn matches(&self, file: &[u8], real: &[u32]) -> Result<bool> {
        self.check(file, real.len())?;
        let word = |k: usize| {
            u32::from_le_bytes([
                file[4 * k],
                file[4 * k + 1],
                file[4 * k + 2],
                file[4 * k + 3],
            ])
        };
        let mut nonzero = 0;
        for (dst, src, len, stride, fill) in self.runs() {
            for (i, &r) in real[dst..dst + len].iter().enumerate() {
                let v = if fill {
                    src as u32
                } else {
                    word((src as isize + i as isize * stride) as usize)
                };
                if v != r {
                    return Ok(false);
                }
                nonzero += usize::from(v != 0);
            }
        }
        Ok(nonzero == real.iter().filter(|&&r| r != 0).count())
    }
}

fn run(dst: usize, src: usize, len: usize, stride: isize, fill: bool) -> Block {
    Block {
        dst,
        src,
        fill,
        dims: [
            Dim {
                count: len,
                dst_step: 1,
                src_step: stride,
            },
            ONE,
            ONE,
        ],
    }
}

/// Folds consecutive blocks alike in their inner dimensions and evenly spaced into one,
/// as dimension `level`.
fn nest(blocks: Vec<Block>, level: usize) -> Vec<Block> {
    let mut out: Vec<Block> = vec![];
    for b in blocks {
        if let Some(last) = out.last_mut()
            && last.fill == b.fill
            && last.dims[..level] == b.dims[..level]
        {
            let step = (
                b.dst as isize - last.dst as isize,
                b.src as isize - last.src as isize,
            );
            let dim = &mut last.dims[level];
            let fits = if dim.count == 1 {
                step.0 > 0 && !(b.fill && step.1 != 0)
            } else {
                step == (
                    dim.dst_step * dim.count as isize,
                    dim.src_step * dim.count as isize,
                )
            };
            if fits {
                if dim.count == 1 {
                    dim.dst_step = step.0;
                    dim.src_step = step.1;
                }
                dim.count += 1;
                continue;
            }
        }
        out.push(b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn tagged(indices: &[Option<usize>]) -> Vec<u32> {
        indices
            .iter()
            .map(|i| i.map_or(0, |i| code(i).to_bits()))
            .collect()
    }

    /// A 5×3 row-major matrix packed in panels of 2 rows (the last padded with zeros):
    /// panel p, depth k, row r holds w[(2p + r) * 3 + k].
    #[test]
    fn packing_is_rebuilt_exactly_in_few_blocks() {
        let (m, k, mr) = (5usize, 3, 2);
        let weights: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut indices = vec![];
        for p in 0..m.div_ceil(mr) {
            for kk in 0..k {
                for r in 0..mr {
                    let row = p * mr + r;
                    indices.push((row < m).then_some(row * k + kk));
                }
            }
        }
        let real: Vec<u32> = indices
            .iter()
            .map(|i| i.map_or(0, |i| weights[i].to_bits()))
            .collect();
        let recipe = Recipe::decode(&tagged(&indices), &real, weights.len()).unwrap();
        let mut out = vec![0.0; real.len()];
        recipe.apply(&file(&weights), &mut out).unwrap();
        assert_eq!(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), real);
        assert!(recipe.matches(&file(&weights), &real).unwrap());
        assert!(recipe.blocks.len() <= 3, "{:?}", recipe.blocks);
        let mut other = real.clone();
        other[1] ^= 1;
        assert!(!recipe.matches(&file(&weights), &other).unwrap());
        // A value where the recipe leaves zero.
        let gap = indices.iter().position(|i| i.is_none()).unwrap();
        other = real.clone();
        other[gap] = 1;
        assert!(!recipe.matches(&file(&weights), &other).unwrap());
    }

    #[test]
    fn literals_other_than_zero_are_kept() {
        let weights = [1.5f32, -2.0];
        let indices = [Some(1), None, Some(0), None];
        let mut real: Vec<u32> = vec![weights[1].to_bits(), 7.0f32.to_bits()];
        real.extend([weights[0].to_bits(), 7.0f32.to_bits()]);
        let recipe = Recipe::decode(&tagged(&indices), &real, 2).unwrap();
        let mut out = vec![0.0; 4];
        recipe.apply(&file(&weights), &mut out).unwrap();
        assert_eq!(out, [-2.0, 7.0, 1.5, 7.0]);
    }

    #[test]
    fn a_recipe_refuses_weights_of_another_size() {
        let recipe = Recipe::decode(&tagged(&[Some(0)]), &[0], 1).unwrap();
        assert!(recipe.apply(&file(&[1.0, 2.0]), &mut [0.0]).is_err());
    }
}
