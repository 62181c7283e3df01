//! BATCH_MATMUL: a weighted layer when one operand is a constant.

use super::{Op, OpFamily, OptionsWriter, Registry, WrittenOptions};
use crate::model::graph::{Graph, Node, OpInputs};
use crate::model::split::LayerKind;
use anyhow::{Result, ensure};
use tract_tflite::tflite::{self, BuiltinOperator, BuiltinOptions};

pub(super) struct BatchMatMul;

impl OpFamily for BatchMatMul {
    fn register(&self, registry: &mut Registry) {
        registry.add(BuiltinOperator::BATCH_MATMUL, |reader| {
            let (adj_x, adj_y) = reader
                .operator
                .builtin_options_as_batch_mat_mul_options()
                .map(|o| (o.adj_x(), o.adj_y()))
                .unwrap_or((false, false));
            reader.node(Op::BatchMatMul { adj_x, adj_y })
        });
    }

    fn output_shape(&self, op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        let (adj_x, adj_y) = adjoints(op);
        inputs.arity(2..=2)?;
        let (a, b) = (inputs.shape(0), inputs.shape(1));
        ensure!(
            a.len() >= 2 && a.len() == b.len(),
            "BATCH_MATMUL ranks {:?} and {:?}",
            a,
            b
        );
        let r = a.len();
        let (m, ka) = if adj_x {
            (a[r - 1], a[r - 2])
        } else {
            (a[r - 2], a[r - 1])
        };
        let (kb, n) = if adj_y {
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
        let mut shape = a[..r - 2].to_vec();
        shape.extend([m, n]);
        Ok(shape)
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        let (adj_x, adj_y) = adjoints(op);
        let options = tflite::BatchMatMulOptions::create(
            writer.builder,
            &tflite::BatchMatMulOptionsArgs {
                adj_x,
                adj_y,
                asymmetric_quantize_inputs: false,
            },
        );
        Ok(WrittenOptions::table(
            BuiltinOptions::BatchMatMulOptions,
            options,
        ))
    }

    fn flops(&self, graph: &Graph, node: &Node) -> u64 {
        let a = &graph.tensors[node.inputs[0]].shape;
        let inner = if adjoints(&node.op).0 {
            a[a.len() - 2]
        } else {
            a[a.len() - 1]
        };
        2 * super::output_elements(graph, node) * inner as u64
    }

    fn weighted_layer(&self, graph: &Graph, node: &Node) -> Option<LayerKind> {
        node.inputs
            .iter()
            .any(|&i| graph.tensors[i].is_const())
            .then_some(LayerKind::Fc)
    }
}

/// `adj_x` and `adj_y`: whether each operand is transposed.
fn adjoints(op: &Op) -> (bool, bool) {
    match op {
        Op::BatchMatMul { adj_x, adj_y } => (*adj_x, *adj_y),
        _ => (false, false),
    }
}
