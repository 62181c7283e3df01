//! The model graph: one TFLite subgraph as typed values.
//!
//! Every shape here is computed from the op and its inputs ([`Graph::output_shapes`], each
//! op's rule living with its family in `model/ops/`), so a file that declares something
//! else is caught at import, not deep inside tract. The op set is closed: an op is either
//! one tract runs (after normalisation) or one normalisation removes. Anything else never
//! makes it into a `Graph`.

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;

pub use super::ops::{
    Activation, BinaryKind, ConvParams, Op, Padding, PoolParams, ReduceKind, StridedSliceParams,
    UnaryKind,
};

/// A tensor's index in [`Graph::tensors`]: nodes refer to tensors by it.
pub type TensorId = usize;

/// Element types a TFLite file may declare (more than tract runs: import normalises the
/// rest away or refuses the model, naming the tensor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float: every activation tract runs and every weight after normalisation.
    F32,
    /// 16-bit float: weights behind DEQUANTIZE, folded to f32 by normalisation.
    F16,
    /// 32-bit integer: shapes, axes, paddings, biases of quantised ops.
    I32,
    /// 64-bit integer: shapes and axes in some converters' output.
    I64,
    /// 16-bit integer: quantised constants.
    I16,
    /// 8-bit integer: quantised weights (dequantised by normalisation).
    I8,
    /// Unsigned 8-bit integer: quantised constants.
    U8,
    /// Boolean.
    Bool,
}

impl DType {
    /// Bytes of one element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
            DType::F16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The lower-case name used in manifests and errors.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }
}

/// Affine quantisation of a constant (`real = (q - zero_point) * scale`), per tensor or per
/// channel along `axis`. Only constants may carry it: quantised activations are rejected.
#[derive(Clone, Debug, PartialEq)]
pub struct Quant {
    /// One scale, or one per channel along `axis`.
    pub scale: Vec<f32>,
    /// One zero point, or one per channel along `axis`.
    pub zero_point: Vec<i64>,
    /// The channel axis of per-channel quantisation (0 when per tensor).
    pub axis: usize,
}

/// How one dimension of a sparse constant is stored (TFLite's `DimensionMetadata`).
#[derive(Clone, Debug, PartialEq)]
pub enum DimMeta {
    /// Every index stored.
    Dense {
        /// The dimension's size.
        size: usize,
    },
    /// Compressed: only the indices present, per segment.
    Csr {
        /// Where each segment's indices start in `indices` (one more entry than segments).
        segments: Vec<usize>,
        /// The indices present.
        indices: Vec<usize>,
    },
}

/// TFLite's sparse encoding of a constant (`SparsityParameters`), undone by normalisation.
#[derive(Clone, Debug, PartialEq)]
pub struct Sparsity {
    /// Order in which the dimensions (and block dimensions) are stored.
    pub traversal_order: Vec<usize>,
    /// The dimensions that are blocked, for each block dimension.
    pub block_map: Vec<usize>,
    /// How each traversed dimension is stored.
    pub dim_metadata: Vec<DimMeta>,
}

/// One tensor of a graph: an activation (computed) or a constant (weights, shapes).
#[derive(Clone, Debug)]
pub struct Tensor {
    /// Its name in the file; unique within a graph (see [`Graph::fresh_name`]).
    pub name: String,
    /// Its shape; activations have every dimension known.
    pub shape: Vec<usize>,
    /// Its element type.
    pub dtype: DType,
    /// Raw little-endian bytes of a constant; `None` for activations and graph inputs.
    /// Shares the imported file's buffer where it can: import holds one copy of the weights.
    pub data: Option<Bytes>,
    /// Quantisation of a constant, if it is quantised.
    pub quant: Option<Quant>,
    /// Sparse encoding of a constant, if it is stored sparse.
    pub sparsity: Option<Sparsity>,
}

impl Tensor {
    /// A computed tensor (no data).
    pub fn activation(name: impl Into<String>, shape: Vec<usize>, dtype: DType) -> Tensor {
        Tensor {
            name: name.into(),
            shape,
            dtype,
            data: None,
            quant: None,
            sparsity: None,
        }
    }

    /// A constant holding `data`, little-endian, in C order.
    pub fn constant(
        name: impl Into<String>,
        shape: Vec<usize>,
        dtype: DType,
        data: impl Into<Bytes>,
    ) -> Tensor {
        Tensor {
            name: name.into(),
            shape,
            dtype,
            data: Some(data.into()),
            quant: None,
            sparsity: None,
        }
    }

    /// An f32 constant of `shape`.
    pub fn f32_constant(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Tensor {
        Tensor::constant(name, shape, DType::F32, f32_bytes(values))
    }

    /// A one-dimensional i32 constant (a shape, axes, paddings).
    pub fn i32_constant(name: impl Into<String>, values: &[i32]) -> Tensor {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::constant(name, vec![values.len()], DType::I32, bytes)
    }

    pub(crate) fn is_const(&self) -> bool {
        self.data.is_some()
    }

    pub(crate) fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.elements() * self.dtype.size()
    }

    /// The values of a small integer constant (shapes, axes, paddings).
    pub(crate) fn int_values(&self) -> Result<Vec<i64>> {
        let data = self
            .data
            .as_ref()
            .with_context(|| format!("tensor '{}' is not a constant", self.name))?;
        Ok(match self.dtype {
            DType::I32 => data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DType::I64 => data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            dt => bail!(
                "tensor '{}' holds {} where integers were expected",
                self.name,
                dt.name()
            ),
        })
    }

    pub(crate) fn f32_values(&self) -> Result<Vec<f32>> {
        let data = self
            .data
            .as_ref()
            .with_context(|| format!("tensor '{}' is not a constant", self.name))?;
        ensure!(
            self.dtype == DType::F32,
            "tensor '{}' is {}, expected f32",
            self.name,
            self.dtype.name()
        );
        Ok(data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }
}

/// The little-endian bytes of `values`, as a constant holds them.
pub fn f32_bytes(values: &[f32]) -> Bytes {
    values
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

/// One operator applied to tensors of the graph.
#[derive(Clone, Debug)]
pub struct Node {
    /// The operator and its options.
    pub op: Op,
    /// Its inputs, in the operator's order.
    pub inputs: Vec<TensorId>,
    /// Its outputs, in the operator's order.
    pub outputs: Vec<TensorId>,
}

/// A single TFLite subgraph, nodes in an order where every input is produced before use.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// Every tensor, indexed by [`TensorId`].
    pub tensors: Vec<Tensor>,
    /// The operators, each after those producing its inputs.
    pub nodes: Vec<Node>,
    /// The graph's inputs.
    pub inputs: Vec<TensorId>,
    /// The graph's outputs.
    pub outputs: Vec<TensorId>,
}

impl Graph {
    /// Adds a tensor and returns its id; names are not checked here (see
    /// [`Graph::fresh_name`]).
    pub fn add_tensor(&mut self, t: Tensor) -> TensorId {
        self.tensors.push(t);
        self.tensors.len() - 1
    }

    /// A tensor name not used yet, derived from `base`.
    pub(crate) fn fresh_name(&self, base: &str) -> String {
        let taken = |n: &str| self.tensors.iter().any(|t| t.name == n);
        if !taken(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !taken(n))
            .expect("unbounded")
    }

    /// Appends a node, computing its output shapes; returns the output tensor ids.
    pub fn add_node(
        &mut self,
        op: Op,
        inputs: Vec<TensorId>,
        output_names: &[&str],
    ) -> Result<Vec<TensorId>> {
        let shapes = self.output_shapes(&op, &inputs)?;
        ensure!(
            shapes.len() == output_names.len(),
            "{} has {} outputs",
            op.name(),
            shapes.len()
        );
        let dtype = self.output_dtype(&op, &inputs);
        let outputs: Vec<TensorId> = shapes
            .into_iter()
            .zip(output_names)
            .map(|(shape, name)| {
                let name = self.fresh_name(name);
                self.add_tensor(Tensor::activation(name, shape, dtype))
            })
            .collect();
        self.nodes.push(Node {
            op,
            inputs,
            outputs: outputs.clone(),
        });
        Ok(outputs)
    }
    fn output_dtype(&self, op: &Op, inputs: &[TensorId]) -> DType {
        let first = inputs
            .first()
            .map(|&i| self.tensors[i].dtype)
            .unwrap_or(DType::F32);
        op.family().output_dtype(op, first)
    }

    /// Output shapes of `op` applied to `inputs`, checking that the inputs make sense.
    pub(crate) fn output_shapes(&self, op: &Op, inputs: &[TensorId]) -> Result<Vec<Vec<usize>>> {
        let inputs = OpInputs {
            graph: self,
            ids: inputs,
            op_name: op.name(),
        };
        Ok(vec![op.family().output_shape(op, &inputs)?])
    }

    /// Recomputes every node's output shapes and checks them against what the tensors say.
    pub fn check_shapes(&self) -> Result<()> {
        for (ix, node) in self.nodes.iter().enumerate() {
            let shapes = self
                .output_shapes(&node.op, &node.inputs)
                .with_context(|| format!("operator #{ix} ({})", node.op.name()))?;
            ensure!(
                shapes.len() == node.outputs.len(),
                "operator #{ix} ({}): {} outputs declared",
                node.op.name(),
                node.outputs.len()
            );
            for (shape, &out) in shapes.iter().zip(&node.outputs) {
                let t = &self.tensors[out];
                ensure!(
                    &t.shape == shape,
                    "operator #{ix} ({}): output '{}' is declared {:?} but its inputs give {:?}",
                    node.op.name(),
                    t.name,
                    t.shape,
                    shape
                );
            }
        }
        Ok(())
    }

    /// Checks the structure: ids in range, each tensor produced once, every input produced
    /// before use, outputs produced, no constant written by an op.
    pub fn check_structure(&self) -> Result<()> {
        let n = self.tensors.len();
        let mut available = vec![false; n];
        for (id, t) in self.tensors.iter().enumerate() {
            if t.is_const() {
                available[id] = true;
                let want = t.bytes();
                let got = t.data.as_ref().map(|d| d.len()).unwrap_or(0);
                if t.sparsity.is_none() {
                    ensure!(
                        got == want,
                        "constant '{}' {:?} {} holds {} bytes, expected {}",
                        t.name,
                        t.shape,
                        t.dtype.name(),
                        got,
                        want
                    );
                }
            }
        }
        for &i in &self.inputs {
            ensure!(i < n, "graph input {i} is not a tensor (only {n})");
            ensure!(
                !self.tensors[i].is_const(),
                "graph input '{}' is a constant",
                self.tensors[i].name
            );
            available[i] = true;
        }
        for (ix, node) in self.nodes.iter().enumerate() {
            for &i in &node.inputs {
                ensure!(
                    i < n,
                    "operator #{ix} ({}) reads tensor {i}, only {n} exist",
                    node.op.name()
                );
                ensure!(
                    available[i],
                    "operator #{ix} ({}) reads '{}' before anything produces it",
                    node.op.name(),
                    self.tensors[i].name
                );
            }
            for &o in &node.outputs {
                ensure!(
                    o < n,
                    "operator #{ix} ({}) writes tensor {o}, only {n} exist",
                    node.op.name()
                );
                ensure!(
                    !available[o],
                    "operator #{ix} ({}) writes '{}', which already has a value",
                    node.op.name(),
                    self.tensors[o].name
                );
                available[o] = true;
            }
        }
        ensure!(!self.outputs.is_empty(), "the graph has no outputs");
        for &o in &self.outputs {
            ensure!(o < n, "graph output {o} is not a tensor (only {n})");
            ensure!(
                available[o],
                "graph output '{}' is never computed",
                self.tensors[o].name
            );
            ensure!(
                !self.tensors[o].is_const(),
                "graph output '{}' is a constant",
                self.tensors[o].name
            );
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tensors {
            ensure!(
                names.insert(t.name.as_str()),
                "tensor name '{}' is used twice",
                t.name
            );
        }
        Ok(())
    }

    /// For each tensor, the index of the last node that reads it (`None` if none does).
    pub(crate) fn last_readers(&self) -> Vec<Option<usize>> {
        let mut last = vec![None; self.tensors.len()];
        for (ix, node) in self.nodes.iter().enumerate() {
            for &i in &node.inputs {
                last[i] = Some(ix);
            }
        }
        last
    }

    /// Bytes of constants read by `node`.
    pub fn weight_bytes(&self, node: &Node) -> usize {
        node.inputs
            .iter()
            .filter(|&&i| self.tensors[i].is_const())
            .map(|&i| self.tensors[i].bytes())
            .sum()
    }

    /// Floating-point operations of one node (a multiply-add counts as two).
    pub fn flops(&self, node: &Node) -> u64 {
        node.op.family().flops(self, node)
    }
}

/// The inputs of one op, as its family's shape rule sees them: by position.
pub(crate) struct OpInputs<'a> {
    graph: &'a Graph,
    ids: &'a [TensorId],
    op_name: &'static str,
}

impl OpInputs<'_> {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Fails unless the op has an allowed number of inputs; check it before reading any.
    pub(crate) fn arity(&self, allowed: std::ops::RangeInclusive<usize>) -> Result<()> {
        ensure!(
            allowed.contains(&self.ids.len()),
            "{} takes {:?} inputs, got {}",
            self.op_name,
            allowed,
            self.ids.len()
        );
        Ok(())
    }

    /// The output shape of an op that maps each element of its one input.
    pub(crate) fn elementwise_shape(&self) -> Result<Vec<usize>> {
        self.arity(1..=1)?;
        Ok(self.shape(0).to_vec())
    }

    pub fn shape(&self, slot: usize) -> &[usize] {
        &self.graph.tensors[self.ids[slot]].shape
    }

    pub(crate) fn shapes(&self) -> impl Iterator<Item = &[usize]> {
        self.ids
            .iter()
            .map(|&id| self.graph.tensors[id].shape.as_slice())
    }

    /// The shape of an NHWC input.
    pub(crate) fn rank4(&self, slot: usize) -> Result<[usize; 4]> {
        match *self.shape(slot) {
            [n, h, w, c] => Ok([n, h, w, c]),
            ref other => bail!(
                "{} needs a rank-4 NHWC input, got shape {:?}",
                self.op_name,
                other
            ),
        }
    }

    /// The values of a constant integer input (a shape, axes, paddings).
    pub(crate) fn const_ints(&self, slot: usize) -> Result<Vec<i64>> {
        self.graph.tensors[self.ids[slot]].int_values()
    }

    /// Fails unless input `slot` is a bias of `channels` values.
    pub(crate) fn check_bias(&self, slot: usize, channels: usize) -> Result<()> {
        let bias = self.shape(slot);
        ensure!(
            bias == [channels],
            "bias has shape {:?}, expected [{}]",
            bias,
            channels
        );
        Ok(())
    }
}

/// Axes as indices in `0..rank`, counting negative ones from the end.
pub(crate) fn normalise_axes(axes: &[i64], rank: usize) -> Result<Vec<usize>> {
    axes.iter()
        .map(|&a| {
            let a2 = if a < 0 { a + rank as i64 } else { a };
            ensure!(
                (0..rank as i64).contains(&a2),
                "axis {} out of rank {}",
                a,
                rank
            );
            Ok(a2 as usize)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structure_check_rejects_reads_before_writes() {
        let mut g = Graph::default();
        let a = g.add_tensor(Tensor::activation("a", vec![1, 4], DType::F32));
        let b = g.add_tensor(Tensor::activation("b", vec![1, 4], DType::F32));
        let c = g.add_tensor(Tensor::activation("c", vec![1, 4], DType::F32));
        g.inputs = vec![a];
        g.outputs = vec![c];
        g.nodes.push(Node {
            op: Op::Binary {
                kind: BinaryKind::Add,
                activation: Activation::None,
            },
            inputs: vec![a, b],
            outputs: vec![c],
        });
        let err = g.check_structure().unwrap_err().to_string();
        assert!(
            err.contains("reads 'b' before anything produces it"),
            "{err}"
        );
    }
}
