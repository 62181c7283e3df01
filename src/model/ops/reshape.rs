//! RESHAPE, and SQUEEZE and EXPAND_DIMS read as RESHAPE to a constant target.

use super::{Op, OpFamily, OperatorReader, OptionsWriter, Registry, WrittenOptions};
use crate::model::graph::{Graph, Node, OpInputs, Tensor, normalise_axes};
use anyhow::{Context, Result, ensure};
use tract_tflite::tflite::{self, BuiltinOperator, BuiltinOptions};

pub(super) struct Reshape;

impl OpFamily for Reshape {
    fn register(&self, registry: &mut Registry) {
        registry.add(BuiltinOperator::RESHAPE, read_reshape);
        registry.add(BuiltinOperator::SQUEEZE, read_squeeze);
        registry.add(BuiltinOperator::EXPAND_DIMS, read_expand_dims);
    }

    fn output_shape(&self, _op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        inputs.arity(2..=2)?;
        let target = inputs
            .const_ints(1)
            .context("RESHAPE needs a constant shape")?;
        reshape_target(inputs.shape(0), &target)
    }

    /// tract reads the target from the options as well as from the second input.
    fn write_options(&self, _op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        let target: Vec<i32> = writer.graph.tensors[writer.node.outputs[0]]
            .shape
            .iter()
            .map(|&d| d as i32)
            .collect();
        let new_shape = writer.builder.create_vector(&target);
        let options = tflite::ReshapeOptions::create(
            writer.builder,
            &tflite::ReshapeOptionsArgs {
                new_shape: Some(new_shape),
            },
        );
        Ok(WrittenOptions::table(
            BuiltinOptions::ReshapeOptions,
            options,
        ))
    }

    fn flops(&self, _graph: &Graph, _node: &Node) -> u64 {
        0
    }

    fn takes_integer_arguments(&self) -> bool {
        true
    }
}

/// The output shape of reshaping `input` to `target`, where one extent may be -1.
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
        .map(|&d| match (d, known) {
            (-1, 0) => 0,
            (-1, _) => total / known as usize,
            _ => d as usize,
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

/// The input and the output of a reshape-like operator, which has one of each.
fn operands(reader: &OperatorReader) -> Result<(usize, usize)> {
    let (inputs, outputs) = (reader.raw_inputs, reader.raw_outputs);
    ensure!(!inputs.is_empty() && inputs[0] >= 0, "missing input");
    ensure!(outputs.len() == 1 && outputs[0] >= 0, "expects one output");
    Ok((inputs[0] as usize, outputs[0] as usize))
}

/// `RESHAPE` options' `new_shape`, where the converter wrote one.
fn new_shape_option(reader: &OperatorReader) -> Option<Vec<i64>> {
    reader
        .operator
        .builtin_options_as_reshape_options()
        .and_then(|o| o.new_shape())
        .map(|v| v.iter().map(|d| d as i64).collect())
}

fn read_reshape(reader: &mut OperatorReader) -> Result<Node> {
    let (x, out) = operands(reader)?;
    let from_input = reader.input(1).map(|i| &reader.graph.tensors[i]);
    let target = match from_input {
        Some(t) if t.is_const() => t.int_values()?,
        Some(t) if t.shape.iter().product::<usize>() == 0 => {
            new_shape_option(reader).unwrap_or_default()
        }
        // A computed shape (from SHAPE etc.): the declared output is all we have, and
        // check_shapes will verify the element count.
        Some(_) => reader.graph.tensors[out]
            .shape
            .iter()
            .map(|&d| d as i64)
            .collect(),
        None => {
            new_shape_option(reader).context("RESHAPE has neither a shape input nor new_shape")?
        }
    };
    reshape_node(reader.graph, x, out, &target)
}

fn read_squeeze(reader: &mut OperatorReader) -> Result<Node> {
    let (x, out) = operands(reader)?;
    let in_shape = &reader.graph.tensors[x].shape;
    let dims: Vec<i64> = reader
        .operator
        .builtin_options_as_squeeze_options()
        .and_then(|o| o.squeeze_dims())
        .map(|v| v.iter().map(|d| d as i64).collect())
        .unwrap_or_default();
    let dims = normalise_axes(&dims, in_shape.len())?;
    let target: Vec<i64> = in_shape
        .iter()
        .enumerate()
        .filter(|&(d, &n)| {
            if dims.is_empty() {
                n != 1
            } else {
                !dims.contains(&d)
            }
        })
        .map(|(_, &n)| n as i64)
        .collect();
    reshape_node(reader.graph, x, out, &target)
}

fn read_expand_dims(reader: &mut OperatorReader) -> Result<Node> {
    let (x, out) = operands(reader)?;
    let axis_tensor = reader.input(1).context("EXPAND_DIMS without axis")?;
    let axis = reader.graph.tensors[axis_tensor].int_values()?;
    ensure!(axis.len() == 1, "EXPAND_DIMS axis must be one value");
    let in_shape = &reader.graph.tensors[x].shape;
    let axis = normalise_axes(&axis, in_shape.len() + 1)?[0];
    let mut target: Vec<i64> = in_shape.iter().map(|&d| d as i64).collect();
    target.insert(axis, 1);
    reshape_node(reader.graph, x, out, &target)
}

/// The RESHAPE of `x` into `out`, its target a new constant with any -1 resolved.
fn reshape_node(graph: &mut Graph, x: usize, out: usize, target: &[i64]) -> Result<Node> {
    let total: usize = graph.tensors[x].shape.iter().product();
    let known: i64 = target.iter().filter(|&&d| d != -1).product();
    let resolved: Vec<i32> = target
        .iter()
        .map(|&d| {
            if d == -1 && known > 0 {
                ((total as i64) / known) as i32
            } else {
                d as i32
            }
        })
        .collect();
    let name = graph.fresh_name(&format!("{}/shape", graph.tensors[out].name));
    let shape = graph.add_tensor(Tensor::i32_constant(name, &resolved));
    Ok(Node {
        op: Op::Reshape,
        inputs: vec![x, shape],
        outputs: vec![out],
    })
}
