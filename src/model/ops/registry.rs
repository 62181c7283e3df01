//! The table of readers by opcode, and what a family's reader and writer see of the file.

use super::{FAMILIES, Op};
use crate::model::graph::{Graph, Node, Tensor, TensorId};
use anyhow::{Context, Result, bail, ensure};
use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
use std::collections::HashMap;
use std::sync::OnceLock;
use tract_tflite::tflite::{self, BuiltinOperator, BuiltinOptions};

/// Builds the node of one operator from the file.
pub(crate) type ReadOperator = fn(&mut OperatorReader) -> Result<Node>;

/// Picks the channel count of a bias from the shape of the filter beside it.
pub(crate) type BiasChannels = fn(&[usize]) -> Option<usize>;

/// How the operators of one opcode are read.
enum Reader {
    /// They carry no options: each is this op.
    Plain(Op),
    Options(ReadOperator),
}

/// The readers of every opcode some family reads.
#[derive(Default)]
pub(crate) struct Registry {
    readers: HashMap<BuiltinOperator, Reader>,
    /// Opcodes registered twice: a bug the tests catch.
    duplicates: Vec<BuiltinOperator>,
}

impl Registry {
    /// Reads the operators of `opcode` with `read`, which looks at their options.
    pub(crate) fn add(&mut self, opcode: BuiltinOperator, read: ReadOperator) {
        self.insert(opcode, Reader::Options(read));
    }

    /// Reads the operators of `opcode`, which carry no options, as `op`.
    pub(crate) fn add_plain(&mut self, opcode: BuiltinOperator, op: Op) {
        self.insert(opcode, Reader::Plain(op));
    }

    fn insert(&mut self, opcode: BuiltinOperator, reader: Reader) {
        if self.readers.insert(opcode, reader).is_some() {
            self.duplicates.push(opcode);
        }
    }

    /// The node of the operator `reader` holds, or `None` when no family reads its opcode.
    pub(crate) fn read(&self, reader: &mut OperatorReader) -> Option<Result<Node>> {
        Some(match self.readers.get(&reader.opcode)? {
            Reader::Plain(op) => reader.node(op.clone()),
            Reader::Options(read) => read(reader),
        })
    }

    fn build() -> Registry {
        let mut registry = Registry::default();
        for family in FAMILIES {
            family.register(&mut registry);
        }
        registry
    }
}

/// The registry of all families, built on first use.
pub(crate) fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::build)
}

/// One TFLite operator as its family's reader sees it. Tensor indices are checked to be in
/// range before a reader runs; -1 marks an omitted optional input.
pub(crate) struct OperatorReader<'a, 'file> {
    pub graph: &'a mut Graph,
    pub(crate) opcode: BuiltinOperator,
    pub(crate) operator: &'a tflite::Operator<'file>,
    pub(crate) raw_inputs: &'a [i32],
    pub(crate) raw_outputs: &'a [i32],
}

impl<'file> OperatorReader<'_, 'file> {
    /// The operator's options table, which `get` reads (one of the generated
    /// `builtin_options_as_…`), or an error naming the table when the operator has none.
    pub(crate) fn options<T>(&self, get: fn(&tflite::Operator<'file>) -> Option<T>) -> Result<T> {
        get(self.operator).with_context(|| format!("missing {}", table_name::<T>()))
    }

    /// The tensor of input `slot`, when the operator names one there.
    pub fn input(&self, slot: usize) -> Option<TensorId> {
        let ix = *self.raw_inputs.get(slot).filter(|&&i| i >= 0)?;
        Some(ix as usize)
    }

    /// The shape of input `slot`, when the operator names a tensor there.
    pub(crate) fn input_shape(&self, slot: usize) -> Option<&[usize]> {
        Some(&self.graph.tensors[self.input(slot)?].shape)
    }

    /// The node of `op` on the operator's tensors, none of which may be omitted.
    pub(crate) fn node(&mut self, op: Op) -> Result<Node> {
        self.node_with_bias(op, None)
    }

    /// The node of an op whose third input is a bias: when it is omitted, a zero bias with
    /// as many values as `channels` picks from the filter's shape (tract's readers insist
    /// on one).
    pub(crate) fn node_with_optional_bias(
        &mut self,
        op: Op,
        channels: BiasChannels,
    ) -> Result<Node> {
        self.node_with_bias(op, Some(channels))
    }

    fn node_with_bias(&mut self, op: Op, bias_channels: Option<BiasChannels>) -> Result<Node> {
        let mut inputs = vec![];
        for (slot, &i) in self.raw_inputs.iter().enumerate() {
            match (i >= 0, bias_channels) {
                (true, _) => inputs.push(i as usize),
                (false, Some(channels)) if slot == 2 => inputs.push(self.zero_bias(channels)?),
                (false, _) => bail!("input {slot} is omitted, which only a bias may be"),
            }
        }
        if let Some(channels) = bias_channels
            && inputs.len() == 2
        {
            inputs.push(self.zero_bias(channels)?);
        }
        let outputs = self
            .raw_outputs
            .iter()
            .map(|&o| {
                ensure!(o >= 0, "omitted output");
                Ok(o as usize)
            })
            .collect::<Result<Vec<_>>>()?;
        ensure!(
            outputs.len() == 1,
            "{} outputs where one is expected",
            outputs.len()
        );
        Ok(Node {
            op,
            inputs,
            outputs,
        })
    }

    fn zero_bias(&mut self, channels: BiasChannels) -> Result<TensorId> {
        let filter = self.input_shape(1).context("missing filter")?;
        let channels = channels(filter).context("scalar filter")?;
        let out = self
            .raw_outputs
            .first()
            .filter(|&&o| o >= 0)
            .map(|&o| self.graph.tensors[o as usize].name.clone())
            .unwrap_or_default();
        let name = self.graph.fresh_name(&format!("{out}/zero_bias"));
        Ok(self.graph.add_tensor(Tensor::f32_constant(
            name,
            vec![channels],
            &vec![0.0; channels],
        )))
    }
}

/// The schema's name of a generated table type, as users of TFLite see it.
fn table_name<T>() -> &'static str {
    let path = std::any::type_name::<T>();
    let name = path.rsplit("::").next().unwrap_or(path);
    name.split('<').next().unwrap_or(name)
}

/// What a family's writer writes into: the file being built, and the node it writes.
pub(crate) struct OptionsWriter<'a, 'fb> {
    pub(crate) builder: &'a mut FlatBufferBuilder<'fb>,
    pub graph: &'a Graph,
    pub(crate) node: &'a Node,
}

impl OptionsWriter<'_, '_> {
    /// An options table without fields (PadOptions, SliceOptions, …), as the generated
    /// `create` of such a table writes it.
    pub(crate) fn empty_table(&mut self, kind: BuiltinOptions) -> WrittenOptions {
        let start = self.builder.start_table();
        let table = self.builder.end_table(start);
        WrittenOptions {
            kind,
            table: Some(WIPOffset::new(table.value())),
        }
    }
}

/// An operator's builtin options: which table, and the table itself (`None` for ops
/// without options).
pub(crate) struct WrittenOptions {
    pub kind: BuiltinOptions,
    pub table: Option<WIPOffset<UnionWIPOffset>>,
}

impl WrittenOptions {
    /// An op that has no options table.
    pub(crate) fn none() -> WrittenOptions {
        WrittenOptions {
            kind: BuiltinOptions::NONE,
            table: None,
        }
    }

    /// The options table `table`, of type `kind`.
    pub(crate) fn table<T>(kind: BuiltinOptions, table: WIPOffset<T>) -> WrittenOptions {
        WrittenOptions {
            kind,
            table: Some(table.as_union_value()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_named_as_in_the_schema() {
        assert_eq!(table_name::<tflite::Conv2DOptions>(), "Conv2DOptions");
    }

    #[test]
    fn each_opcode_has_one_reader() {
        assert_eq!(registry().duplicates, vec![]);
    }
}
