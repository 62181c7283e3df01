//! The model graph: one TFLite subgraph as typed values.
//!
//! Every shape here is computed from the op and its inputs ([`Graph::infer_shapes`]), so a
//! file that declares something else is caught at import, not deep inside tract. The op set
//! is closed: an op is either one tract runs (after normalisation) or one normalisation
//! removes. Anything else never makes it into a `Graph`.

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;

pub type TensorId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    I32,
    I64,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
            DType::F16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

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
    pub scale: Vec<f32>,
    pub zero_point: Vec<i64>,
    pub axis: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum DimMeta {
    Dense {
        size: usize,
    },
    Csr {
        segments: Vec<usize>,
        indices: Vec<usize>,
    },
}

/// TFLite's sparse encoding of a constant (`SparsityParameters`), undone by normalisation.
#[derive(Clone, Debug, PartialEq)]
pub struct Sparsity {
    pub traversal_order: Vec<usize>,
    pub block_map: Vec<usize>,
    pub dim_metadata: Vec<DimMeta>,
}

#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// Raw little-endian bytes of a constant; `None` for activations and graph inputs.
    /// Shares the imported file's buffer where it can: import holds one copy of the weights.
    pub data: Option<Bytes>,
    pub quant: Option<Quant>,
    pub sparsity: Option<Sparsity>,
}

impl Tensor {
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

    pub fn f32_constant(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Tensor {
        Tensor::constant(name, shape, DType::F32, f32_bytes(values))
    }

    pub fn i32_constant(name: impl Into<String>, values: &[i32]) -> Tensor {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::constant(name, vec![values.len()], DType::I32, bytes)
    }

    pub fn is_const(&self) -> bool {
        self.data.is_some()
    }

    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.elements() * self.dtype.size()
    }

    /// The values of a small integer constant (shapes, axes, paddings).
    pub fn int_values(&self) -> Result<Vec<i64>> {
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

    pub fn f32_values(&self) -> Result<Vec<f32>> {
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

pub fn f32_bytes(values: &[f32]) -> Bytes {
    values
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    Same,
    Valid,
}

/// Fused activations. tract reads `None`, `Relu` and `Relu6`; normalisation turns the
/// others into separate ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    Relu6,
    ReluN1To1,
    Tanh,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvParams {
    pub padding: Padding,
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    pub activation: Activation,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolParams {
    pub padding: Padding,
    pub stride: [usize; 2],
    pub filter: [usize; 2],
    pub activation: Activation,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryKind {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryKind {
    Relu,
    Relu6,
    Logistic,
    Tanh,
    HardSwish,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Square,
    Abs,
    Floor,
    Ceil,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceKind {
    Mean,
    Sum,
    Max,
    Min,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StridedSliceParams {
    pub begin_mask: u32,
    pub end_mask: u32,
    pub shrink_axis_mask: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Conv2d(ConvParams),
    DepthwiseConv2d {
        conv: ConvParams,
        depth_multiplier: usize,
    },
    FullyConnected {
        activation: Activation,
        keep_num_dims: bool,
    },
    BatchMatMul {
        adj_x: bool,
        adj_y: bool,
    },
    MaxPool2d(PoolParams),
    AvgPool2d(PoolParams),
    Binary {
        kind: BinaryKind,
        activation: Activation,
    },
    Unary(UnaryKind),
    LeakyRelu {
        alpha: f32,
    },
    Softmax {
        beta: f32,
    },
    Concatenation {
        axis: usize,
        activation: Activation,
    },
    /// Target shape is the second input, a constant (SQUEEZE and EXPAND_DIMS are read as this).
    Reshape,
    Pad,
    PadV2,
    Reduce {
        kind: ReduceKind,
        keep_dims: bool,
    },
    ResizeBilinear {
        align_corners: bool,
        half_pixel_centers: bool,
    },
    ResizeNearest {
        align_corners: bool,
        half_pixel_centers: bool,
    },
    StridedSlice(StridedSliceParams),
    Slice,
    Transpose,
    // Removed by normalisation: tract 0.23 cannot read them.
    Dequantize,
    Densify,
    Prelu,
    DepthToSpace {
        block: usize,
    },
    LocalResponseNorm {
        radius: usize,
        bias: f32,
        alpha: f32,
        beta: f32,
    },
}

impl Op {
    /// TFLite's name for the op, as users see it in converters and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv2d(_) => "CONV_2D",
            Op::DepthwiseConv2d { .. } => "DEPTHWISE_CONV_2D",
            Op::FullyConnected { .. } => "FULLY_CONNECTED",
            Op::BatchMatMul { .. } => "BATCH_MATMUL",
            Op::MaxPool2d(_) => "MAX_POOL_2D",
            Op::AvgPool2d(_) => "AVERAGE_POOL_2D",
            Op::Binary { kind, .. } => match kind {
                BinaryKind::Add => "ADD",
                BinaryKind::Sub => "SUB",
                BinaryKind::Mul => "MUL",
                BinaryKind::Div => "DIV",
                BinaryKind::Maximum => "MAXIMUM",
                BinaryKind::Minimum => "MINIMUM",
            },
            Op::Unary(kind) => match kind {
                UnaryKind::Relu => "RELU",
                UnaryKind::Relu6 => "RELU6",
                UnaryKind::Logistic => "LOGISTIC",
                UnaryKind::Tanh => "TANH",
                UnaryKind::HardSwish => "HARD_SWISH",
                UnaryKind::Exp => "EXP",
                UnaryKind::Log => "LOG",
                UnaryKind::Sqrt => "SQRT",
                UnaryKind::Rsqrt => "RSQRT",
                UnaryKind::Square => "SQUARE",
                UnaryKind::Abs => "ABS",
                UnaryKind::Floor => "FLOOR",
                UnaryKind::Ceil => "CEIL",
            },
            Op::LeakyRelu { .. } => "LEAKY_RELU",
            Op::Softmax { .. } => "SOFTMAX",
            Op::Concatenation { .. } => "CONCATENATION",
            Op::Reshape => "RESHAPE",
            Op::Pad => "PAD",
            Op::PadV2 => "PADV2",
            Op::Reduce { kind, .. } => match kind {
                ReduceKind::Mean => "MEAN",
                ReduceKind::Sum => "SUM",
                ReduceKind::Max => "REDUCE_MAX",
                ReduceKind::Min => "REDUCE_MIN",
            },
            Op::ResizeBilinear { .. } => "RESIZE_BILINEAR",
            Op::ResizeNearest { .. } => "RESIZE_NEAREST_NEIGHBOR",
            Op::StridedSlice(_) => "STRIDED_SLICE",
            Op::Slice => "SLICE",
            Op::Transpose => "TRANSPOSE",
            Op::Dequantize => "DEQUANTIZE",
            Op::Densify => "DENSIFY",
            Op::Prelu => "PRELU",
            Op::DepthToSpace { .. } => "DEPTH_TO_SPACE",
            Op::LocalResponseNorm { .. } => "LOCAL_RESPONSE_NORMALIZATION",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
}

/// A single TFLite subgraph, nodes in an order where every input is produced before use.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub tensors: Vec<Tensor>,
    pub nodes: Vec<Node>,
    pub inputs: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
}

impl Graph {
    pub fn add_tensor(&mut self, t: Tensor) -> TensorId {
        self.tensors.push(t);
        self.tensors.len() - 1
    }

    /// A tensor name not used yet, derived from `base`.
    pub fn fresh_name(&self, base: &str) -> String {
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
        match op {
            Op::Dequantize => DType::F32,
            _ => inputs
                .first()
                .map(|&i| self.tensors[i].dtype)
                .unwrap_or(DType::F32),
        }
    }

    fn shape(&self, id: TensorId) -> &[usize] {
        &self.tensors[id].shape
    }

    fn const_ints(&self, id: TensorId) -> Result<Vec<i64>> {
        self.tensors[id].int_values()
    }

    /// Output shapes of `op` applied to `inputs`, checking that the inputs make sense.
    pub fn output_shapes(&self, op: &Op, inputs: &[TensorId]) -> Result<Vec<Vec<usize>>> {
        let arity = |n: std::ops::RangeInclusive<usize>| -> Result<()> {
            ensure!(
                n.contains(&inputs.len()),
                "{} takes {:?} inputs, got {}",
                op.name(),
                n,
                inputs.len()
            );
            Ok(())
        };
        let rank4 = |id: TensorId| -> Result<[usize; 4]> {
            let s = self.shape(id);
            ensure!(
                s.len() == 4,
                "{} needs a rank-4 NHWC input, got shape {:?}",
                op.name(),
                s
            );
            Ok([s[0], s[1], s[2], s[3]])
        };
        let shape = match op {
            Op::Conv2d(p) => {
                arity(3..=3)?;
                let [n, h, w, c] = rank4(inputs[0])?;
                let k = self.shape(inputs[1]);
                ensure!(k.len() == 4, "CONV_2D filter must be OHWI, got {:?}", k);
                ensure!(
                    k[3] == c,
                    "CONV_2D filter has {} input channels, input has {}",
                    k[3],
                    c
                );
                check_bias(self.shape(inputs[2]), k[0])?;
                let (oh, ow) = conv_out(h, w, [k[1], k[2]], p.stride, p.dilation, p.padding)?;
                vec![n, oh, ow, k[0]]
            }
            Op::DepthwiseConv2d {
                conv,
                depth_multiplier,
            } => {
                arity(3..=3)?;
                let [n, h, w, c] = rank4(inputs[0])?;
                let k = self.shape(inputs[1]);
                ensure!(
                    k.len() == 4 && k[0] == 1,
                    "DEPTHWISE_CONV_2D filter must be 1HWC, got {:?}",
                    k
                );
                ensure!(
                    k[3] == c * depth_multiplier,
                    "DEPTHWISE_CONV_2D filter has {} channels, input {} × multiplier {}",
                    k[3],
                    c,
                    depth_multiplier
                );
                check_bias(self.shape(inputs[2]), k[3])?;
                let (oh, ow) =
                    conv_out(h, w, [k[1], k[2]], conv.stride, conv.dilation, conv.padding)?;
                vec![n, oh, ow, k[3]]
            }
            Op::FullyConnected { keep_num_dims, .. } => {
                arity(3..=3)?;
                let x = self.shape(inputs[0]);
                let wt = self.shape(inputs[1]);
                ensure!(
                    wt.len() == 2,
                    "FULLY_CONNECTED weights must be [out, in], got {:?}",
                    wt
                );
                let elems: usize = x.iter().product();
                ensure!(
                    wt[1] > 0 && elems.is_multiple_of(wt[1]),
                    "FULLY_CONNECTED input {:?} does not divide into rows of {}",
                    x,
                    wt[1]
                );
                check_bias(self.shape(inputs[2]), wt[0])?;
                if *keep_num_dims {
                    ensure!(
                        x.last() == Some(&wt[1]),
                        "FULLY_CONNECTED keep_num_dims needs last dim {}",
                        wt[1]
                    );
                    let mut s = x.to_vec();
                    *s.last_mut().unwrap() = wt[0];
                    s
                } else {
                    vec![elems / wt[1], wt[0]]
                }
            }
            Op::BatchMatMul { adj_x, adj_y } => {
                arity(2..=2)?;
                let (a, b) = (self.shape(inputs[0]), self.shape(inputs[1]));
                ensure!(
                    a.len() >= 2 && a.len() == b.len(),
                    "BATCH_MATMUL ranks {:?} and {:?}",
                    a,
                    b
                );
                let r = a.len();
                let (m, ka) = if *adj_x {
                    (a[r - 1], a[r - 2])
                } else {
                    (a[r - 2], a[r - 1])
                };
                let (kb, nn) = if *adj_y {
                    (b[r - 1], b[r - 2])
                } else {
                    (b[r - 2], b[r - 1])
                };
                ensure!(
                    ka == kb && a[..r - 2] == b[..r - 2],
                    "BATCH_MATMUL shapes {:?} × {:?} disagree",
                    a,
                    b
                );
                let mut s = a[..r - 2].to_vec();
                s.extend([m, nn]);
                s
            }
            Op::MaxPool2d(p) | Op::AvgPool2d(p) => {
                arity(1..=1)?;
                let [n, h, w, c] = rank4(inputs[0])?;
                let (oh, ow) = conv_out(h, w, p.filter, p.stride, [1, 1], p.padding)?;
                vec![n, oh, ow, c]
            }
            Op::Binary { .. } => {
                arity(2..=2)?;
                broadcast(self.shape(inputs[0]), self.shape(inputs[1]))
                    .with_context(|| format!("{}: shapes do not broadcast", op.name()))?
            }
            Op::Unary(_) | Op::LeakyRelu { .. } | Op::Softmax { .. } => {
                arity(1..=1)?;
                self.shape(inputs[0]).to_vec()
            }
            Op::Prelu => {
                arity(2..=2)?;
                let s = broadcast(self.shape(inputs[0]), self.shape(inputs[1]))?;
                ensure!(
                    s == self.shape(inputs[0]),
                    "PRELU alpha {:?} widens input {:?}",
                    self.shape(inputs[1]),
                    self.shape(inputs[0])
                );
                s
            }
            Op::Concatenation { axis, .. } => {
                ensure!(!inputs.is_empty(), "CONCATENATION needs inputs");
                let first = self.shape(inputs[0]);
                ensure!(
                    *axis < first.len(),
                    "CONCATENATION axis {} out of rank {}",
                    axis,
                    first.len()
                );
                let mut s = first.to_vec();
                s[*axis] = 0;
                for &i in inputs {
                    let o = self.shape(i);
                    ensure!(
                        o.len() == first.len(),
                        "CONCATENATION ranks differ: {:?} vs {:?}",
                        first,
                        o
                    );
                    for d in 0..o.len() {
                        ensure!(
                            d == *axis || o[d] == first[d],
                            "CONCATENATION shapes {:?} and {:?}",
                            first,
                            o
                        );
                    }
                    s[*axis] += o[*axis];
                }
                s
            }
            Op::Reshape => {
                arity(2..=2)?;
                let target = self
                    .const_ints(inputs[1])
                    .context("RESHAPE needs a constant shape")?;
                reshape_target(self.shape(inputs[0]), &target)?
            }
            Op::Pad | Op::PadV2 => {
                arity(2..=3)?;
                let x = self.shape(inputs[0]);
                let pads = self
                    .const_ints(inputs[1])
                    .context("PAD needs constant paddings")?;
                ensure!(
                    pads.len() == 2 * x.len(),
                    "PAD paddings {:?} do not match rank {}",
                    pads,
                    x.len()
                );
                ensure!(
                    pads.iter().all(|&p| (0..1 << 20).contains(&p)),
                    "PAD paddings {:?} out of range",
                    pads
                );
                x.iter()
                    .enumerate()
                    .map(|(d, &n)| n + pads[2 * d] as usize + pads[2 * d + 1] as usize)
                    .collect()
            }
            Op::Reduce { keep_dims, .. } => {
                arity(2..=2)?;
                let x = self.shape(inputs[0]);
                let axes = normalise_axes(&self.const_ints(inputs[1])?, x.len())?;
                x.iter()
                    .enumerate()
                    .filter_map(|(d, &n)| match (axes.contains(&d), keep_dims) {
                        (true, true) => Some(1),
                        (true, false) => None,
                        (false, _) => Some(n),
                    })
                    .collect()
            }
            Op::ResizeBilinear { .. } | Op::ResizeNearest { .. } => {
                arity(2..=2)?;
                let [n, _, _, c] = rank4(inputs[0])?;
                let size = self.const_ints(inputs[1])?;
                ensure!(
                    size.len() == 2 && size.iter().all(|&s| (1..1 << 16).contains(&s)),
                    "{} size {:?} is not two positive extents",
                    op.name(),
                    size
                );
                vec![n, size[0] as usize, size[1] as usize, c]
            }
            Op::StridedSlice(p) => {
                arity(4..=4)?;
                let x = self.shape(inputs[0]);
                let (b, e, s) = (
                    self.const_ints(inputs[1])?,
                    self.const_ints(inputs[2])?,
                    self.const_ints(inputs[3])?,
                );
                ensure!(
                    b.len() == x.len() && e.len() == x.len() && s.len() == x.len(),
                    "STRIDED_SLICE arguments do not match rank {}",
                    x.len()
                );
                let mut out = vec![];
                for d in 0..x.len() {
                    let (lo, hi) = strided_bounds(
                        x[d],
                        b[d],
                        e[d],
                        s[d],
                        p.begin_mask >> d & 1 == 1,
                        p.end_mask >> d & 1 == 1,
                    )?;
                    let step = s[d];
                    let (span, step) = if step > 0 {
                        ((hi - lo).max(0), step)
                    } else {
                        ((lo - hi).max(0), -step)
                    };
                    let n = (span + step - 1) / step;
                    if p.shrink_axis_mask >> d & 1 == 1 {
                        ensure!(n == 1, "STRIDED_SLICE shrinks axis {} of extent {}", d, n);
                    } else {
                        out.push(n as usize);
                    }
                }
                out
            }
            Op::Slice => {
                arity(3..=3)?;
                let x = self.shape(inputs[0]);
                let (b, s) = (self.const_ints(inputs[1])?, self.const_ints(inputs[2])?);
                ensure!(
                    b.len() == x.len() && s.len() == x.len(),
                    "SLICE arguments do not match rank {}",
                    x.len()
                );
                let mut out = vec![];
                for d in 0..x.len() {
                    let size = if s[d] == -1 { x[d] as i64 - b[d] } else { s[d] };
                    ensure!(
                        b[d] >= 0 && size >= 0 && b[d] + size <= x[d] as i64,
                        "SLICE [{}, +{}) out of extent {}",
                        b[d],
                        size,
                        x[d]
                    );
                    out.push(size as usize);
                }
                out
            }
            Op::Transpose => {
                arity(2..=2)?;
                let x = self.shape(inputs[0]);
                let perm = self.const_ints(inputs[1])?;
                let mut seen = vec![false; x.len()];
                ensure!(
                    perm.len() == x.len(),
                    "TRANSPOSE permutation {:?} for rank {}",
                    perm,
                    x.len()
                );
                for &p in &perm {
                    ensure!(
                        (0..x.len() as i64).contains(&p) && !seen[p as usize],
                        "TRANSPOSE permutation {:?} invalid",
                        perm
                    );
                    seen[p as usize] = true;
                }
                perm.iter().map(|&p| x[p as usize]).collect()
            }
            Op::Dequantize | Op::Densify => {
                arity(1..=1)?;
                self.shape(inputs[0]).to_vec()
            }
            Op::DepthToSpace { block } => {
                arity(1..=1)?;
                let [n, h, w, c] = rank4(inputs[0])?;
                ensure!(
                    *block > 0 && c % (block * block) == 0,
                    "DEPTH_TO_SPACE block {} does not divide {} channels",
                    block,
                    c
                );
                vec![n, h * block, w * block, c / (block * block)]
            }
            Op::LocalResponseNorm { .. } => {
                arity(1..=1)?;
                rank4(inputs[0])?.to_vec()
            }
        };
        Ok(vec![shape])
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
    pub fn last_readers(&self) -> Vec<Option<usize>> {
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
        let out: u64 = node
            .outputs
            .iter()
            .map(|&o| self.tensors[o].elements() as u64)
            .sum();
        let shape = |i: usize| &self.tensors[node.inputs[i]].shape;
        match &node.op {
            Op::Conv2d(_) => {
                let k = shape(1);
                2 * out * (k[1] * k[2] * k[3]) as u64
            }
            Op::DepthwiseConv2d { .. } => {
                let k = shape(1);
                2 * out * (k[1] * k[2]) as u64
            }
            Op::FullyConnected { .. } => 2 * out * shape(1)[1] as u64,
            Op::BatchMatMul { adj_x, .. } => {
                let a = shape(0);
                let k = if *adj_x {
                    a[a.len() - 2]
                } else {
                    a[a.len() - 1]
                };
                2 * out * k as u64
            }
            Op::MaxPool2d(p) | Op::AvgPool2d(p) => out * (p.filter[0] * p.filter[1]) as u64,
            Op::Reduce { .. } => self.tensors[node.inputs[0]].elements() as u64,
            Op::Reshape | Op::Dequantize | Op::Densify => 0,
            _ => out,
        }
    }
}

fn check_bias(bias: &[usize], channels: usize) -> Result<()> {
    ensure!(
        bias == [channels],
        "bias has shape {:?}, expected [{}]",
        bias,
        channels
    );
    Ok(())
}

/// Output extent of a sliding window, TFLite's rules for SAME and VALID.
pub fn conv_out(
    h: usize,
    w: usize,
    k: [usize; 2],
    s: [usize; 2],
    d: [usize; 2],
    p: Padding,
) -> Result<(usize, usize)> {
    ensure!(
        s.iter().chain(&d).chain(&k).all(|&v| v > 0),
        "zero kernel, stride or dilation"
    );
    let one = |n: usize, k: usize, s: usize, d: usize| -> Result<usize> {
        let eff = (k - 1) * d + 1;
        Ok(match p {
            Padding::Same => n.div_ceil(s),
            Padding::Valid => {
                ensure!(n >= eff, "window {} larger than input {}", eff, n);
                (n - eff) / s + 1
            }
        })
    };
    Ok((one(h, k[0], s[0], d[0])?, one(w, k[1], s[1], d[1])?))
}

/// Numpy-style broadcast of two shapes.
pub fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let get = |s: &[usize], i: usize| {
        if i + s.len() >= r {
            s[i + s.len() - r]
        } else {
            1
        }
    };
    (0..r)
        .map(|i| match (get(a, i), get(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            (x, y) => bail!("{:?} and {:?} differ at axis {} ({} vs {})", a, b, i, x, y),
        })
        .collect()
}

pub fn normalise_axes(axes: &[i64], rank: usize) -> Result<Vec<usize>> {
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

fn reshape_target(input: &[usize], target: &[i64]) -> Result<Vec<usize>> {
    let total: usize = input.iter().product();
    let known: i64 = target.iter().filter(|&&d| d != -1).product();
    ensure!(
        target.iter().filter(|&&d| d == -1).count() <= 1,
        "RESHAPE target {:?} has several -1",
        target
    );
    ensure!(
        target.iter().all(|&d| d == -1 || d >= 0),
        "RESHAPE target {:?} has negative extents",
        target
    );
    let out: Vec<usize> = target
        .iter()
        .map(|&d| {
            if d == -1 {
                if known == 0 {
                    0
                } else {
                    total / known as usize
                }
            } else {
                d as usize
            }
        })
        .collect();
    ensure!(
        out.iter().product::<usize>() == total,
        "RESHAPE of {:?} to {:?} changes the element count",
        input,
        target
    );
    Ok(out)
}

/// Resolved [begin, end) of one strided-slice axis, clamped as TFLite does.
pub fn strided_bounds(
    n: usize,
    b: i64,
    e: i64,
    s: i64,
    begin_masked: bool,
    end_masked: bool,
) -> Result<(i64, i64)> {
    ensure!(s != 0, "STRIDED_SLICE stride is zero");
    let n = n as i64;
    let fix = |v: i64| if v < 0 { v + n } else { v };
    let (lo, hi) = if s > 0 {
        (
            if begin_masked { 0 } else { fix(b).clamp(0, n) },
            if end_masked { n } else { fix(e).clamp(0, n) },
        )
    } else {
        (
            if begin_masked {
                n - 1
            } else {
                fix(b).clamp(-1, n - 1)
            },
            if end_masked {
                -1
            } else {
                fix(e).clamp(-1, n - 1)
            },
        )
    };
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_and_valid_extents_follow_tflite() {
        assert_eq!(
            conv_out(227, 227, [11, 11], [4, 4], [1, 1], Padding::Valid).unwrap(),
            (55, 55)
        );
        assert_eq!(
            conv_out(56, 56, [3, 3], [2, 2], [1, 1], Padding::Same).unwrap(),
            (28, 28)
        );
        assert!(conv_out(2, 2, [3, 3], [1, 1], [1, 1], Padding::Valid).is_err());
    }

    #[test]
    fn broadcast_follows_numpy() {
        assert_eq!(broadcast(&[1, 4, 4, 8], &[8]).unwrap(), vec![1, 4, 4, 8]);
        assert_eq!(
            broadcast(&[1, 1, 8], &[1, 4, 4, 8]).unwrap(),
            vec![1, 4, 4, 8]
        );
        assert!(broadcast(&[3], &[4]).is_err());
    }

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
