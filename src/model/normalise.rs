//! Rewrites a graph read from a published TFLite file into ops tract-tflite 0.23 reads and
//! computes correctly. Each rewrite is exact or within float rounding of TFLite's reference
//! kernels; `tests/reference.rs` checks the results against ai-edge-litert.

use super::graph::*;
use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use std::collections::BTreeMap;
use tract_core::prelude::f16;

/// What normalisation changed, by rewrite, for the manifest and the log.
pub type Report = BTreeMap<&'static str, usize>;

pub fn normalise(graph: &mut Graph) -> Result<Report> {
    let mut report = Report::new();
    fold_constants(graph, &mut report)?;
    rewrite_ops(graph, &mut report)?;
    graph.canonicalise();
    graph.check_structure().context("after normalisation")?;
    graph.check_shapes().context("after normalisation")?;
    check_runnable(graph)?;
    Ok(report)
}

/// DENSIFY and DEQUANTIZE of constants become constants; quantised or half-precision weights
/// read directly by compute ops become float32.
fn fold_constants(graph: &mut Graph, report: &mut Report) -> Result<()> {
    let nodes = std::mem::take(&mut graph.nodes);
    for (ix, node) in nodes.into_iter().enumerate() {
        let ctx = || format!("operator #{ix} ({})", node.op.name());
        match node.op {
            Op::Densify => {
                let src = &graph.tensors[node.inputs[0]];
                ensure!(
                    src.is_const(),
                    "{}: densifying a computed tensor is not supported",
                    ctx()
                );
                let dense = densify(src).with_context(ctx)?;
                let dtype = src.dtype;
                let out = &mut graph.tensors[node.outputs[0]];
                out.data = Some(dense);
                out.dtype = dtype;
                *report.entry("densify").or_default() += 1;
            }
            Op::Dequantize => {
                let src = &graph.tensors[node.inputs[0]];
                ensure!(
                    src.is_const(),
                    "{}: dequantising a computed tensor means int8 activations, which are not supported",
                    ctx()
                );
                let values = dequantize(src).with_context(ctx)?;
                let kind = if src.dtype == DType::F16 {
                    "dequantize-f16"
                } else {
                    "dequantize-int"
                };
                ensure!(
                    graph.tensors[node.outputs[0]].shape == src.shape,
                    "{}: output shape differs from input",
                    ctx()
                );
                let out = &mut graph.tensors[node.outputs[0]];
                out.data = Some(f32_bytes(&values));
                out.dtype = DType::F32;
                *report.entry(kind).or_default() += 1;
            }
            _ => graph.nodes.push(node),
        }
    }
    // Weights stored as f16 or int8 with a scale, read without a DEQUANTIZE op.
    let mut to_float = vec![];
    for node in &graph.nodes {
        for &i in &node.inputs {
            let t = &graph.tensors[i];
            let int_argument = matches!(t.dtype, DType::I32 | DType::I64) && t.quant.is_none();
            if t.is_const() && t.dtype != DType::F32 && !int_argument {
                to_float.push(i);
            }
        }
    }
    to_float.sort_unstable();
    to_float.dedup();
    for i in to_float {
        let t = &graph.tensors[i];
        ensure!(
            t.sparsity.is_none(),
            "constant '{}' is sparse but no DENSIFY reads it",
            t.name
        );
        let values = dequantize(t).with_context(|| format!("constant '{}'", t.name))?;
        let t = &mut graph.tensors[i];
        t.data = Some(f32_bytes(&values));
        t.dtype = DType::F32;
        t.quant = None;
        *report.entry("weights-to-f32").or_default() += 1;
    }
    Ok(())
}

/// float16 or affine-quantised integer constant → f32 values.
pub fn dequantize(t: &Tensor) -> Result<Vec<f32>> {
    let data = t.data.as_ref().context("not a constant")?;
    let n = t.elements();
    let q = t.quant.clone().unwrap_or(Quant {
        scale: vec![1.0],
        zero_point: vec![0],
        axis: 0,
    });
    let channel = |i: usize| -> usize {
        if q.scale.len() <= 1 || t.shape.is_empty() {
            return 0;
        }
        let inner: usize = t.shape[q.axis.min(t.shape.len() - 1) + 1..]
            .iter()
            .product();
        (i / inner.max(1)) % t.shape[q.axis.min(t.shape.len() - 1)]
    };
    if q.scale.len() > 1 {
        ensure!(
            q.axis < t.shape.len() && q.scale.len() == t.shape[q.axis],
            "{} scales for axis {} of {:?}",
            q.scale.len(),
            q.axis,
            t.shape
        );
    }
    let zp = |c: usize| {
        q.zero_point
            .get(c)
            .or(q.zero_point.first())
            .copied()
            .unwrap_or(0) as f32
    };
    let affine = |i: usize, v: f32| (v - zp(channel(i))) * q.scale[channel(i)];
    let need = n * t.dtype.size();
    ensure!(
        data.len() == need,
        "{} bytes where {} are needed",
        data.len(),
        need
    );
    Ok(match t.dtype {
        DType::F16 => data
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DType::I8 => data
            .iter()
            .enumerate()
            .map(|(i, &b)| affine(i, b as i8 as f32))
            .collect(),
        DType::U8 => data
            .iter()
            .enumerate()
            .map(|(i, &b)| affine(i, b as f32))
            .collect(),
        DType::I16 => data
            .chunks_exact(2)
            .enumerate()
            .map(|(i, c)| affine(i, i16::from_le_bytes([c[0], c[1]]) as f32))
            .collect(),
        dt => bail!("cannot turn {} into float", dt.name()),
    })
}

/// Expands TFLite's sparse constant encoding into dense bytes, following
/// `tflite::internal::sparsity::FormatConverter::SparseToDense`.
pub fn densify(t: &Tensor) -> Result<Bytes> {
    let s = t
        .sparsity
        .as_ref()
        .context("DENSIFY input has no sparsity parameters")?;
    let src = t.data.as_ref().context("not a constant")?;
    let esize = t.dtype.size();
    let dense_shape = &t.shape;
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
    let elements: usize = dense_shape.iter().product();
    let mut dest = vec![0u8; elements * esize];
    let mut walker = Walker {
        s,
        rank,
        block_size,
        dense_shape,
        src,
        esize,
        src_pos: 0,
        dest: &mut dest,
        indices: vec![0; total_rank],
    };
    walker.populate(0, 0)?;
    ensure!(
        walker.src_pos * esize == src.len(),
        "sparse data holds {} values, the encoding visits {}",
        src.len() / esize,
        walker.src_pos
    );
    Ok(dest.into())
}

struct Walker<'a> {
    s: &'a Sparsity,
    rank: usize,
    block_size: Vec<usize>,
    dense_shape: &'a [usize],
    src: &'a [u8],
    esize: usize,
    src_pos: usize,
    dest: &'a mut [u8],
    indices: Vec<usize>,
}

impl Walker<'_> {
    fn populate(&mut self, level: usize, prev: usize) -> Result<()> {
        if level == self.indices.len() {
            let mut orig = vec![0usize; self.rank];
            for i in 0..self.rank {
                orig[self.s.traversal_order[i]] = self.indices[i];
            }
            for i in self.rank..self.indices.len() {
                let block = self.s.traversal_order[i] - self.rank;
                let dim = self.s.block_map[block];
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
            let from = self.src_pos * self.esize;
            let value = self
                .src
                .get(from..from + self.esize)
                .context("sparse data ends early")?;
            self.dest[flat * self.esize..(flat + 1) * self.esize].copy_from_slice(value);
            self.src_pos += 1;
            return Ok(());
        }
        match &self.s.dim_metadata[level] {
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
}

/// Emits replacement nodes; the last node of a replacement writes the original output tensor
/// so that nothing downstream changes.
struct Rewriter<'g> {
    graph: &'g mut Graph,
    out: Vec<Node>,
}

impl Rewriter<'_> {
    fn emit(&mut self, op: Op, inputs: Vec<TensorId>, name: &str) -> Result<TensorId> {
        let shapes = self.graph.output_shapes(&op, &inputs)?;
        let name = self.graph.fresh_name(name);
        let t = self
            .graph
            .add_tensor(Tensor::activation(name, shapes[0].clone(), DType::F32));
        self.out.push(Node {
            op,
            inputs,
            outputs: vec![t],
        });
        Ok(t)
    }

    fn emit_into(&mut self, op: Op, inputs: Vec<TensorId>, output: TensorId) -> Result<()> {
        let shapes = self.graph.output_shapes(&op, &inputs)?;
        ensure!(
            shapes[0] == self.graph.tensors[output].shape,
            "rewrite of '{}' gives {:?}",
            self.graph.tensors[output].name,
            shapes[0]
        );
        self.out.push(Node {
            op,
            inputs,
            outputs: vec![output],
        });
        Ok(())
    }

    fn scalar(&mut self, name: &str, v: f32) -> TensorId {
        let name = self.graph.fresh_name(name);
        self.graph
            .add_tensor(Tensor::f32_constant(name, vec![1], &[v]))
    }

    fn ints(&mut self, name: &str, v: &[i32], shape: Vec<usize>) -> TensorId {
        let name = self.graph.fresh_name(name);
        let mut t = Tensor::i32_constant(name, v);
        t.shape = shape;
        self.graph.add_tensor(t)
    }

    fn reshape(&mut self, x: TensorId, shape: &[usize], name: &str) -> Result<TensorId> {
        let target: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
        let s = self.ints(&format!("{name}/shape"), &target, vec![target.len()]);
        self.emit(Op::Reshape, vec![x, s], name)
    }

    fn name(&self, t: TensorId) -> String {
        self.graph.tensors[t].name.clone()
    }
}

fn rewrite_ops(graph: &mut Graph, report: &mut Report) -> Result<()> {
    let nodes = std::mem::take(&mut graph.nodes);
    let mut rw = Rewriter {
        graph,
        out: Vec::with_capacity(nodes.len()),
    };
    for (ix, node) in nodes.into_iter().enumerate() {
        let name = node.op.name();
        let kind =
            rewrite_one(&mut rw, node).with_context(|| format!("operator #{ix} ({name})"))?;
        if let Some(kind) = kind {
            *report.entry(kind).or_default() += 1;
        }
    }
    let out = rw.out;
    graph.nodes = out;
    Ok(())
}

/// Rewrites one node if it needs it; returns the name of the rewrite applied.
fn rewrite_one(rw: &mut Rewriter, mut node: Node) -> Result<Option<&'static str>> {
    let out = node.outputs[0];
    let out_name = rw.name(out);
    // A fused TANH is ignored by every float TFLite kernel (their activation range for it
    // is unbounded), so the model's meaning is the op without it: drop it, and say so.
    if let Some(act) = fused_activation_mut(&mut node.op)
        && *act == Activation::Tanh
    {
        *act = Activation::None;
        log::warn!("'{out_name}': fused TANH activation ignored, as TFLite's kernels ignore it");
        rewrite_one(rw, node)?;
        return Ok(Some("ignored-fused-tanh"));
    }
    // Fused activations tract does not read become ops of their own.
    if let Some(act) = fused_activation_mut(&mut node.op)
        && *act == Activation::ReluN1To1
    {
        *act = Activation::None;
        let pre = rw.graph.fresh_name(&format!("{out_name}/pre_activation"));
        let shape = rw.graph.tensors[out].shape.clone();
        let pre = rw
            .graph
            .add_tensor(Tensor::activation(pre, shape, DType::F32));
        node.outputs = vec![pre];
        rewrite_one(rw, node)?;
        {
            {
                let lo = rw.scalar(&format!("{out_name}/minus_one"), -1.0);
                let hi = rw.scalar(&format!("{out_name}/one"), 1.0);
                let m = rw.emit(
                    Op::Binary {
                        kind: BinaryKind::Maximum,
                        activation: Activation::None,
                    },
                    vec![pre, lo],
                    &format!("{out_name}/floor"),
                )?;
                rw.emit_into(
                    Op::Binary {
                        kind: BinaryKind::Minimum,
                        activation: Activation::None,
                    },
                    vec![m, hi],
                    out,
                )?;
            }
        }
        return Ok(Some("split-fused-activation"));
    }
    let g = &*rw.graph;
    match &node.op {
        Op::Prelu => {
            let (x, alpha) = (node.inputs[0], node.inputs[1]);
            let bin = |kind| Op::Binary {
                kind,
                activation: Activation::None,
            };
            let alphas = if g.tensors[alpha].is_const() {
                g.tensors[alpha].f32_values().ok()
            } else {
                None
            };
            // For alpha <= 1, prelu(x) = max(x, alpha·x); for alpha >= 1, min(x, alpha·x).
            // Both are exact, signed zeros included (TFLite computes x >= 0 ? x : alpha·x),
            // and two ops that tract fuses into the preceding conv.
            let bound = match alphas {
                Some(a) if a.iter().all(|&v| v <= 1.0) => Some(BinaryKind::Maximum),
                Some(a) if a.iter().all(|&v| v >= 1.0) => Some(BinaryKind::Minimum),
                _ => None,
            };
            if let Some(kind) = bound {
                let scaled = rw.emit(
                    bin(BinaryKind::Mul),
                    vec![x, alpha],
                    &format!("{out_name}/scaled"),
                )?;
                rw.emit_into(bin(kind), vec![x, scaled], out)?;
                return Ok(Some("prelu"));
            }
            // Mixed slopes: max(x,0) + alpha·min(x,0), equal in value (one term is always
            // zero) but +0 where TFLite gives -0 for a negative x times a zero slope.
            let zero = rw.scalar(&format!("{out_name}/zero"), 0.0);
            let pos = rw.emit(
                bin(BinaryKind::Maximum),
                vec![x, zero],
                &format!("{out_name}/pos"),
            )?;
            let neg = rw.emit(
                bin(BinaryKind::Minimum),
                vec![x, zero],
                &format!("{out_name}/neg"),
            )?;
            let scaled = rw.emit(
                bin(BinaryKind::Mul),
                vec![neg, alpha],
                &format!("{out_name}/neg_scaled"),
            )?;
            rw.emit_into(bin(BinaryKind::Add), vec![pos, scaled], out)?;
            Ok(Some("prelu"))
        }
        Op::Reduce {
            kind: ReduceKind::Mean,
            keep_dims,
        } => {
            // tract 0.23's f32 MEAN multiplies by the reciprocal count with an integer
            // rounding `scale` op; a SUM and a true division match the reference kernel.
            let x = node.inputs[0];
            let axes = normalise_axes(
                &g.tensors[node.inputs[1]].int_values()?,
                g.tensors[x].shape.len(),
            )?;
            let shape = g.tensors[x].shape.clone();
            if shape.len() == 4 && axes == [1, 2] {
                // Global average pooling. As one pooling op it also keeps tract from folding
                // the division into the next layer's matmul in a whole-model plan, which
                // would make layer-by-layer results differ in the last bits.
                let pool = PoolParams {
                    padding: Padding::Valid,
                    stride: [1, 1],
                    filter: [shape[1], shape[2]],
                    activation: Activation::None,
                };
                if *keep_dims {
                    rw.emit_into(Op::AvgPool2d(pool), vec![x], out)?;
                } else {
                    let pooled =
                        rw.emit(Op::AvgPool2d(pool), vec![x], &format!("{out_name}/pooled"))?;
                    let target: Vec<i32> = [shape[0] as i32, shape[3] as i32].to_vec();
                    let t = rw.ints(&format!("{out_name}/shape"), &target, vec![2]);
                    rw.emit_into(Op::Reshape, vec![pooled, t], out)?;
                }
                return Ok(Some("mean"));
            }
            let count: usize = axes.iter().map(|&a| shape[a]).product();
            let axes_t = rw.ints(
                &format!("{out_name}/axes"),
                &axes.iter().map(|&a| a as i32).collect::<Vec<_>>(),
                vec![axes.len()],
            );
            let sum = rw.emit(
                Op::Reduce {
                    kind: ReduceKind::Sum,
                    keep_dims: *keep_dims,
                },
                vec![x, axes_t],
                &format!("{out_name}/sum"),
            )?;
            let n = rw.scalar(&format!("{out_name}/count"), count as f32);
            rw.emit_into(
                Op::Binary {
                    kind: BinaryKind::Div,
                    activation: Activation::None,
                },
                vec![sum, n],
                out,
            )?;
            Ok(Some("mean"))
        }
        Op::Reduce { kind, keep_dims } => {
            let x = node.inputs[0];
            let axes = normalise_axes(
                &g.tensors[node.inputs[1]].int_values()?,
                g.tensors[x].shape.len(),
            )?;
            let axes_t = rw.ints(
                &format!("{out_name}/axes"),
                &axes.iter().map(|&a| a as i32).collect::<Vec<_>>(),
                vec![axes.len()],
            );
            rw.emit_into(
                Op::Reduce {
                    kind: *kind,
                    keep_dims: *keep_dims,
                },
                vec![x, axes_t],
                out,
            )?;
            Ok(None)
        }
        Op::DepthToSpace { block } => {
            let b = *block;
            let s = g.tensors[node.inputs[0]].shape.clone();
            let (n, h, w, c) = (s[0], s[1], s[2], s[3]);
            let split = rw.reshape(
                node.inputs[0],
                &[n, h, w, b, b, c / (b * b)],
                &format!("{out_name}/blocks"),
            )?;
            let perm = rw.ints(&format!("{out_name}/perm"), &[0, 1, 3, 2, 4, 5], vec![6]);
            let moved = rw.emit(
                Op::Transpose,
                vec![split, perm],
                &format!("{out_name}/interleaved"),
            )?;
            let target: Vec<i32> = [n, h * b, w * b, c / (b * b)]
                .iter()
                .map(|&d| d as i32)
                .collect();
            let shape = rw.ints(&format!("{out_name}/shape"), &target, vec![4]);
            rw.emit_into(Op::Reshape, vec![moved, shape], out)?;
            Ok(Some("depth-to-space"))
        }
        Op::LocalResponseNorm {
            radius,
            bias,
            alpha,
            beta,
        } => {
            let (r, bias, alpha, beta) = (*radius, *bias, *alpha, *beta);
            let x = node.inputs[0];
            let s = g.tensors[x].shape.clone();
            let sq = rw.emit(
                Op::Binary {
                    kind: BinaryKind::Mul,
                    activation: Activation::None,
                },
                vec![x, x],
                &format!("{out_name}/sq"),
            )?;
            let pads = rw.ints(
                &format!("{out_name}/pads"),
                &[0, 0, 0, 0, 0, 0, r as i32, r as i32],
                vec![4, 2],
            );
            let padded = rw.emit(Op::Pad, vec![sq, pads], &format!("{out_name}/sq_padded"))?;
            let size = rw.ints(
                &format!("{out_name}/size"),
                &s.iter().map(|&d| d as i32).collect::<Vec<_>>(),
                vec![4],
            );
            let mut sum = None;
            for k in 0..=2 * r {
                let begin = rw.ints(
                    &format!("{out_name}/begin{k}"),
                    &[0, 0, 0, k as i32],
                    vec![4],
                );
                let window = rw.emit(
                    Op::Slice,
                    vec![padded, begin, size],
                    &format!("{out_name}/window{k}"),
                )?;
                sum = Some(match sum {
                    None => window,
                    Some(acc) => rw.emit(
                        Op::Binary {
                            kind: BinaryKind::Add,
                            activation: Activation::None,
                        },
                        vec![acc, window],
                        &format!("{out_name}/sum{k}"),
                    )?,
                });
            }
            let alpha_t = rw.scalar(&format!("{out_name}/alpha"), alpha);
            let bias_t = rw.scalar(&format!("{out_name}/bias"), bias);
            let nbeta_t = rw.scalar(&format!("{out_name}/neg_beta"), -beta);
            let scaled = rw.emit(
                Op::Binary {
                    kind: BinaryKind::Mul,
                    activation: Activation::None,
                },
                vec![sum.expect("radius ≥ 0 gives one window"), alpha_t],
                &format!("{out_name}/scaled"),
            )?;
            let base = rw.emit(
                Op::Binary {
                    kind: BinaryKind::Add,
                    activation: Activation::None,
                },
                vec![scaled, bias_t],
                &format!("{out_name}/base"),
            )?;
            let log = rw.emit(
                Op::Unary(UnaryKind::Log),
                vec![base],
                &format!("{out_name}/log"),
            )?;
            let pw = rw.emit(
                Op::Binary {
                    kind: BinaryKind::Mul,
                    activation: Activation::None,
                },
                vec![log, nbeta_t],
                &format!("{out_name}/log_pow"),
            )?;
            let factor = rw.emit(
                Op::Unary(UnaryKind::Exp),
                vec![pw],
                &format!("{out_name}/factor"),
            )?;
            rw.emit_into(
                Op::Binary {
                    kind: BinaryKind::Mul,
                    activation: Activation::None,
                },
                vec![x, factor],
                out,
            )?;
            Ok(Some("local-response-norm"))
        }
        Op::Softmax { beta } if *beta != 1.0 => {
            let b = rw.scalar(&format!("{out_name}/beta"), *beta);
            let scaled = rw.emit(
                Op::Binary {
                    kind: BinaryKind::Mul,
                    activation: Activation::None,
                },
                vec![node.inputs[0], b],
                &format!("{out_name}/scaled"),
            )?;
            rw.emit_into(Op::Softmax { beta: 1.0 }, vec![scaled], out)?;
            Ok(Some("softmax-beta"))
        }
        Op::FullyConnected {
            activation,
            keep_num_dims,
        } if g.tensors[node.inputs[0]].shape.len() != 2 || *keep_num_dims => {
            let activation = *activation;
            let (x, w, b) = (node.inputs[0], node.inputs[1], node.inputs[2]);
            let cols = g.tensors[w].shape[1];
            let rows = g.tensors[x].elements() / cols;
            let out_shape = g.tensors[out].shape.clone();
            let flat = rw.reshape(x, &[rows, cols], &format!("{out_name}/rows"))?;
            if out_shape.len() == 2 {
                rw.emit_into(
                    Op::FullyConnected {
                        activation,
                        keep_num_dims: false,
                    },
                    vec![flat, w, b],
                    out,
                )?;
            } else {
                let y = rw.emit(
                    Op::FullyConnected {
                        activation,
                        keep_num_dims: false,
                    },
                    vec![flat, w, b],
                    &format!("{out_name}/flat"),
                )?;
                let target: Vec<i32> = out_shape.iter().map(|&d| d as i32).collect();
                let shape = rw.ints(&format!("{out_name}/shape"), &target, vec![target.len()]);
                rw.emit_into(Op::Reshape, vec![y, shape], out)?;
            }
            Ok(Some("fully-connected-rank"))
        }
        Op::StridedSlice(p) => {
            let p = *p;
            let x = node.inputs[0];
            let shape = g.tensors[x].shape.clone();
            let (b, e, st) = (
                g.tensors[node.inputs[1]].int_values()?,
                g.tensors[node.inputs[2]].int_values()?,
                g.tensors[node.inputs[3]].int_values()?,
            );
            let mut bounds = vec![];
            for d in 0..shape.len() {
                bounds.push(strided_bounds(
                    shape[d],
                    b[d],
                    e[d],
                    st[d],
                    p.begin_mask >> d & 1 == 1,
                    p.end_mask >> d & 1 == 1,
                )?);
            }
            let sliced_name = format!("{out_name}/unshrunk");
            let sliced = if st.iter().all(|&s| s == 1) {
                // tract's SLICE is the plain case of its strided slice, and has none of the mask rules.
                let begin: Vec<i32> = bounds.iter().map(|&(lo, _)| lo as i32).collect();
                let size: Vec<i32> = bounds
                    .iter()
                    .map(|&(lo, hi)| (hi - lo).max(0) as i32)
                    .collect();
                let begin = rw.ints(&format!("{out_name}/begin"), &begin, vec![shape.len()]);
                let size = rw.ints(&format!("{out_name}/size"), &size, vec![shape.len()]);
                rw.emit(Op::Slice, vec![x, begin, size], &sliced_name)?
            } else {
                let mut end_mask = 0u32;
                let begin: Vec<i32> = bounds.iter().map(|&(lo, _)| lo as i32).collect();
                let end: Vec<i32> = bounds
                    .iter()
                    .enumerate()
                    .map(|(d, &(_, hi))| {
                        if hi < 0 {
                            end_mask |= 1 << d;
                        }
                        hi as i32
                    })
                    .collect();
                let strides: Vec<i32> = st.iter().map(|&s| s as i32).collect();
                let n = shape.len();
                let (bt, et, stt) = (
                    rw.ints(&format!("{out_name}/begin"), &begin, vec![n]),
                    rw.ints(&format!("{out_name}/end"), &end, vec![n]),
                    rw.ints(&format!("{out_name}/strides"), &strides, vec![n]),
                );
                let params = StridedSliceParams {
                    begin_mask: 0,
                    end_mask,
                    shrink_axis_mask: 0,
                };
                rw.emit(Op::StridedSlice(params), vec![x, bt, et, stt], &sliced_name)?
            };
            let target: Vec<i32> = rw.graph.tensors[out]
                .shape
                .iter()
                .map(|&d| d as i32)
                .collect();
            let shape_t = rw.ints(&format!("{out_name}/shape"), &target, vec![target.len()]);
            rw.emit_into(Op::Reshape, vec![sliced, shape_t], out)?;
            Ok(Some("strided-slice"))
        }
        Op::Slice => {
            // Explicit sizes: tract reads a size of -1 as a huge unsigned extent.
            let x = node.inputs[0];
            let shape = g.tensors[x].shape.clone();
            let (b, s) = (
                g.tensors[node.inputs[1]].int_values()?,
                g.tensors[node.inputs[2]].int_values()?,
            );
            let size: Vec<i32> = (0..shape.len())
                .map(|d| {
                    if s[d] == -1 {
                        (shape[d] as i64 - b[d]) as i32
                    } else {
                        s[d] as i32
                    }
                })
                .collect();
            let begin: Vec<i32> = b.iter().map(|&v| v as i32).collect();
            let bt = rw.ints(&format!("{out_name}/begin"), &begin, vec![shape.len()]);
            let st = rw.ints(&format!("{out_name}/size"), &size, vec![shape.len()]);
            rw.emit_into(Op::Slice, vec![x, bt, st], out)?;
            Ok(None)
        }
        Op::Pad | Op::PadV2 => {
            // tract reads paddings as an i32 [rank, 2] matrix only.
            let x = node.inputs[0];
            let rank = g.tensors[x].shape.len();
            let pads: Vec<i32> = g.tensors[node.inputs[1]]
                .int_values()?
                .iter()
                .map(|&v| v as i32)
                .collect();
            let mut inputs = node.inputs.clone();
            inputs[1] = rw.ints(&format!("{out_name}/paddings"), &pads, vec![rank, 2]);
            if node.op == Op::PadV2 {
                let value = rw.graph.tensors[inputs[2]]
                    .f32_values()
                    .context("PADV2 value")?;
                ensure!(value.len() == 1, "PADV2 needs one padding value");
                inputs[2] = rw.scalar(&format!("{out_name}/pad_value"), value[0]);
            }
            rw.emit_into(node.op.clone(), inputs, out)?;
            Ok(None)
        }
        Op::Transpose | Op::ResizeBilinear { .. } | Op::ResizeNearest { .. } => {
            let vals: Vec<i32> = g.tensors[node.inputs[1]]
                .int_values()?
                .iter()
                .map(|&v| v as i32)
                .collect();
            let mut inputs = node.inputs.clone();
            inputs[1] = rw.ints(&format!("{out_name}/arg"), &vals, vec![vals.len()]);
            rw.emit_into(node.op.clone(), inputs, out)?;
            Ok(None)
        }
        _ => {
            rw.out.push(node);
            Ok(None)
        }
    }
}

fn fused_activation_mut(op: &mut Op) -> Option<&mut Activation> {
    match op {
        Op::Conv2d(c) => Some(&mut c.activation),
        Op::DepthwiseConv2d { conv, .. } => Some(&mut conv.activation),
        Op::FullyConnected { activation, .. } => Some(activation),
        Op::MaxPool2d(p) | Op::AvgPool2d(p) => Some(&mut p.activation),
        Op::Binary { activation, .. } => Some(activation),
        Op::Concatenation { activation, .. } => Some(activation),
        _ => None,
    }
}

/// The contract with the runtime: only ops and forms tract-tflite 0.23 reads correctly.
pub fn check_runnable(graph: &Graph) -> Result<()> {
    for (ix, node) in graph.nodes.iter().enumerate() {
        let name = node.op.name();
        match &node.op {
            Op::Dequantize
            | Op::Densify
            | Op::Prelu
            | Op::DepthToSpace { .. }
            | Op::LocalResponseNorm { .. }
            | Op::Reduce {
                kind: ReduceKind::Mean,
                ..
            } => {
                bail!("operator #{ix} ({name}) survived normalisation")
            }
            Op::StridedSlice(p) if p.shrink_axis_mask != 0 => {
                bail!("operator #{ix} ({name}) still shrinks axes")
            }
            Op::Softmax { beta } if *beta != 1.0 => {
                bail!("operator #{ix} ({name}) has beta {beta}")
            }
            _ => {}
        }
        let mut op = node.op.clone();
        if let Some(a) = fused_activation_mut(&mut op) {
            ensure!(
                matches!(a, Activation::None | Activation::Relu | Activation::Relu6),
                "operator #{ix} ({name}) keeps fused {:?}",
                a
            );
        }
        for &i in &node.inputs {
            let t = &graph.tensors[i];
            ensure!(
                t.sparsity.is_none() && t.quant.is_none(),
                "operator #{ix} ({name}) reads encoded constant '{}'",
                t.name
            );
            ensure!(
                matches!(t.dtype, DType::F32 | DType::I32),
                "operator #{ix} ({name}) reads {} tensor '{}'",
                t.dtype.name(),
                t.name
            );
        }
    }
    Ok(())
}
