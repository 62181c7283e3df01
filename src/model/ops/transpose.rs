//! TRANSPOSE by a constant permutation.

use super::{Op, OpFamily, OptionsWriter, Registry, WrittenOptions};
use crate::model::graph::{Node, OpInputs};
use crate::model::normalise::Rewriter;
use anyhow::{Result, ensure};
use tract_tflite::tflite::{BuiltinOperator, BuiltinOptions};

pub(super) struct Transpose;

impl OpFamily for Transpose {
    fn register(&self, registry: &mut Registry) {
        registry.add_plain(BuiltinOperator::TRANSPOSE, Op::Transpose);
    }

    fn output_shape(&self, _op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        inputs.arity(2..=2)?;
        let x = inputs.shape(0);
        let perm = inputs.const_ints(1)?;
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
        Ok(perm.iter().map(|&p| x[p as usize]).collect())
    }

    fn write_options(&self, _op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        Ok(writer.empty_table(BuiltinOptions::TransposeOptions))
    }

    fn takes_integer_arguments(&self) -> bool {
        true
    }

    fn normalise(&self, node: Node, rewriter: &mut Rewriter) -> Result<Option<&'static str>> {
        rewriter.keep_with_i32_argument(node)?;
        Ok(None)
    }
}
