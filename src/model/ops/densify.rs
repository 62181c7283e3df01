//! DENSIFY of a sparse constant (`SparsityParameters`), folded at import into the dense
//! constant.

use super::{Op, OpFamily, OptionsWriter, Registry, WrittenOptions};
use crate::model::graph::{DimMeta, Graph, Node, OpInputs, Sparsity, Tensor};
use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use tract_tflite::tflite::{BuiltinOperator, BuiltinOptions};

pub(super) struct Densify;

impl OpFamily for Densify {
    fn register(&self, registry: &mut Registry) {
        registry.add_plain(BuiltinOperator::DENSIFY, Op::Densify);
    }

    fn output_shape(&self, _op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        inputs.elementwise_shape()
    }

    fn write_options(&self, _op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        Ok(writer.empty_table(BuiltinOptions::DensifyOptions))
    }

    fn flops(&self, _graph: &Graph, _node: &Node) -> u64 {
        0
    }

    fn fold_constant(&self, graph: &mut Graph, node: &Node) -> Result<Option<&'static str>> {
        let source = &graph.tensors[node.inputs[0]];
        ensure!(
            source.is_const(),
            "densifying a computed tensor is not supported"
        );
        let dense = densify(source)?;
        let dtype = source.dtype;
        let out = &mut graph.tensors[node.outputs[0]];
        out.data = Some(dense);
        out.dtype = dtype;
        Ok(Some("densify"))
    }

    fn unrunnable(&self, _op: &Op) -> Option<String> {
        super::survived_normalisation()
    }
}

/// Expands TFLite's sparse constant encoding into dense bytes, following
/// `tflite::internal::sparsity::FormatConverter::SparseToDense`.
pub fn densify(t: &Tensor) -> Result<Bytes> {
    let sparsity = t
        .sparsity
        .as_ref()
        .context("DENSIFY input has no sparsity parameters")?;
    let src = t.data.as_ref().context("not a constant")?;
    let element_size = t.dtype.size();
    let dense_shape = &t.shape;
    let block_size = block_sizes(sparsity, dense_shape)?;
    let elements: usize = dense_shape.iter().product();
    let mut dest = vec![0u8; elements * element_size];
    let mut walker = Walker {
        sparsity,
        rank: dense_shape.len(),
        block_size,
        dense_shape,
        src,
        element_size,
        src_pos: 0,
        dest: &mut dest,
        indices: vec![0; sparsity.traversal_order.len()],
    };
    walker.populate(0, 0)?;
    ensure!(
        walker.src_pos * element_size == src.len(),
        "sparse data holds {} values, the encoding visits {}",
        src.len() / element_size,
        walker.src_pos
    );
    Ok(dest.into())
}

/// Checks the traversal order and block map; returns the extent of each block dimension.
fn block_sizes(s: &Sparsity, dense_shape: &[usize]) -> Result<Vec<usize>> {
    let rank = dense_shape.len();
    let total_rank = s.traversal_order.len();
    ensure!(
        total_rank >= rank && total_rank == rank + s.block_map.len(),
        "traversal order of {} for rank {} with {} blocks",
        total_rank,
        rank,
        s.block_map.len()
    );
    let mut order_seen = vec![false; total_rank];
    for &d in &s.traversal_order {
        ensure!(
            d < total_rank && !order_seen[d],
            "traversal order {:?} is not a permutation",
            s.traversal_order
        );
        order_seen[d] = true;
    }
    let mut block_size = vec![];
    for (i, &orig) in s.block_map.iter().enumerate() {
        ensure!(
            orig < rank,
            "block map {:?} out of rank {}",
            s.block_map,
            rank
        );
        let size = match s.dim_metadata.get(rank + i) {
            Some(DimMeta::Dense { size }) if *size > 0 => *size,
            _ => bail!(
                "block dimension {} must be dense with a positive size",
                rank + i
            ),
        };
        ensure!(
            dense_shape[orig].is_multiple_of(size),
            "block {} does not divide extent {}",
            size,
            dense_shape[orig]
        );
        block_size.push(size);
    }
    Ok(block_size)
}

/// Walks the encoded dimensions in traversal order, copying each stored value to its dense
/// position.
struct Walker<'a> {
    sparsity: &'a Sparsity,
    rank: usize,
    block_size: Vec<usize>,
    dense_shape: &'a [usize],
    src: &'a [u8],
    element_size: usize,
    src_pos: usize,
    dest: &'a mut [u8],
    indices: Vec<usize>,
}

impl Walker<'_> {
    fn populate(&mut self, level: usize, prev: usize) -> Result<()> {
        if level == self.indices.len() {
            return self.copy_value();
        }
        match &self.sparsity.dim_metadata[level] {
            DimMeta::Dense { size } => {
                for i in 0..*size {
                    self.indices[level] = i;
                    self.populate(level + 1, prev * size + i)?;
                }
            }
            DimMeta::Csr { segments, indices } => {
                let lo = *segments.get(prev).context("segment index out of range")?;
                let hi = *segments
                    .get(prev + 1)
                    .context("segment index out of range")?;
                ensure!(
                    lo <= hi && hi <= indices.len(),
                    "segment [{lo}, {hi}) out of {} indices",
                    indices.len()
                );
                for (i, &index) in indices.iter().enumerate().take(hi).skip(lo) {
                    self.indices[level] = index;
                    self.populate(level + 1, i)?;
                }
            }
        }
        Ok(())
    }

    /// Copies the next stored value to the dense position of the current indices.
    fn copy_value(&mut self) -> Result<()> {
        let s = self.sparsity;
        let mut orig = vec![0usize; self.rank];
        for i in 0..self.rank {
            orig[s.traversal_order[i]] = self.indices[i];
        }
        for i in self.rank..self.indices.len() {
            let block = s.traversal_order[i] - self.rank;
            let dim = s.block_map[block];
            orig[dim] = orig[dim] * self.block_size[block] + self.indices[i];
        }
        let mut flat = 0usize;
        for (d, &ix) in orig.iter().enumerate() {
            ensure!(
                ix < self.dense_shape[d],
                "index {} out of extent {} on axis {}",
                ix,
                self.dense_shape[d],
                d
            );
            flat = flat * self.dense_shape[d] + ix;
        }
        let size = self.element_size;
        let from = self.src_pos * size;
        let value = self
            .src
            .get(from..from + size)
            .context("sparse data ends early")?;
        self.dest[flat * size..(flat + 1) * size].copy_from_slice(value);
        self.src_pos += 1;
        Ok(())
    }
}
