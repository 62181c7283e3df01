//! Cheaper reloads: a layer's plan template.
//!
//! Loading a layer is mostly tract's declutter and codegen (`benches/reload.rs`), and
//! their result depends on the layer's structure, not on its weight values. The first load
//! of a layer therefore also plans it once with every weight value replaced by a tag (its
//! index, see `recipe.rs`): each weight tensor of that plan says, value by value, which
//! weight it holds. The template keeps the real plan's graph without its weight tensors,
//! and per weight tensor a recipe (strided gathers). A reload reads and checks the file as
//! a full load does, gathers the tensors by their recipes, puts them into a copy of the
//! graph and builds the runnable plan: no parse, no declutter, no codegen.
//!
//! A template is only kept after a reload through it gave the very plan of a full load:
//! every node's op (packed weights included, compared by value), its wiring and its facts.
//! A layer whose plan does not check out is always loaded in full.

use super::engine::{LoadPhases, LoadedLayer, Plan, optimise, parse};
use super::recipe::{MAX_CODES, Recipe, code};
use crate::model::Package;
use crate::model::graph::DType;
use anyhow::{Context, Result, bail, ensure};
use std::hash::Hasher;
use std::time::Instant;
use tract_core::internal::*;
use tract_core::ops::konst::Const;
use tract_core::ops::matmul::optimized::{MatMulOperand, OptMatMul, ProtoFusedSpec};
use tract_core::tract_linalg::mmm::{EagerPackedInput, MMMInputValue, PackedMatrixStorage};
use tract_core::tract_linalg::pack::PackedFormat;

/// Where one tagged weight tensor lies in the layer file.
#[derive(Clone, Copy, Debug)]
struct Source {
    /// Byte offset of its data.
    offset: usize,
    /// f32 values.
    len: usize,
}

/// A weight tensor of the plan: the `holder`-th weight data of node `node` (see `holders`).
#[derive(Clone, Debug)]
struct Slot {
    node: usize,
    holder: usize,
    form: Form,
    recipe: Recipe,
}

#[derive(Clone, Debug)]
enum Form {
    /// A plain f32 constant of this shape.
    Plain(TVec<usize>),
    /// A packed matrix: its bytes and alignment.
    Packed { bytes: usize, align: usize },
}

impl Form {
    fn bytes(&self) -> u64 {
        match self {
            Form::Plain(shape) => shape.iter().product::<usize>() as u64 * 4,
            Form::Packed { bytes, .. } => *bytes as u64,
        }
    }
}

/// What a layer's plan is without its weights, and how to put them back.
#[derive(Debug)]
pub struct LayerTemplate {
    /// The optimised graph, each slot's data replaced by an empty placeholder.
    graph: TypedModel,
    slots: Vec<Slot>,
    sources: Vec<Source>,
    /// The file's size and a hash of every byte outside the tagged weights: a reload
    /// through the template is only for the file it was made from.
    file_bytes: usize,
    fingerprint: u64,
    /// Heap bytes it holds (its graph, recipes and sources), measured when it was made.
    bytes: u64,
}

impl LayerTemplate {
    /// Bytes of the recipes.
    pub fn recipe_bytes(&self) -> u64 {
        self.slots.iter().map(|s| s.recipe.bytes()).sum()
    }

    /// Heap bytes the template holds: what keeping it costs, and dropping it frees.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Bytes of the constants of `graph` (an upper bound of what it shares with a plan).
fn constant_bytes(graph: &TypedModel) -> u64 {
    graph
        .nodes
        .iter()
        .filter_map(|n| n.op_as::<Const>())
        .map(|k| (k.val().len() * k.val().datum_type().size_of()) as u64)
        .sum()
}

/// One weight data a node holds.
enum Data<'a> {
    Plain(&'a Tensor),
    Packed(&'a EagerPackedInput),
}

/// The weight data of a node, in a fixed order: a constant's tensor (or each packed
/// matrix it holds), or the packed matrices baked into a matmul.
fn packed(v: &dyn MMMInputValue) -> Result<Data<'_>> {
    v.downcast_ref::<EagerPackedInput>()
        .map(Data::Packed)
        .context("a packed weight tract keeps in another form")
}

fn holders(node: &TypedNode) -> Result<Vec<Data<'_>>> {
    if let Some(k) = node.op_as::<Const>() {
        let t = k.val();
        return match t.storage_as::<PackedMatrixStorage>() {
            Some(s) => s.values().iter().map(|v| packed(&**v)).collect(),
            None if t.is_plain() => Ok(vec![Data::Plain(t)]),
            None => bail!("a constant in a storage tract keeps otherwise"),
        };
    }
    let mut out = vec![];
    if let Some(mm) = node.op_as::<OptMatMul>() {
        for op in &mm.micro_ops {
            if let ProtoFusedSpec::AddMatMul { a, b, .. } = op {
                for operand in [a, b] {
                    if let MatMulOperand::Const(v) = operand {
                        out.push(packed(&**v)?);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The data of one slot, ready to go into a graph.
enum Built {
    Plain(Tensor),
    Packed(Blob),
}

/// Puts `data` in place of the `holder`-th weight data of node `node`.
fn install(graph: &mut TypedModel, node: usize, holder: usize, data: Built) -> Result<()> {
    let n = graph.node_mut(node);
    if let Some(k) = n.op_as::<Const>() {
        let exotic = k.exotic_fact().map(tract_core::dyn_clone::clone_box);
        let t = k.val();
        let tensor = match (t.storage_as::<PackedMatrixStorage>(), data) {
            (Some(s), Built::Packed(blob)) => {
                let mut values: TVec<Box<dyn MMMInputValue>> = s.values().iter().cloned().collect();
                values[holder] = Box::new(EagerPackedInput {
                    packed: Arc::new(blob),
                    ..values[holder]
                        .downcast_ref::<EagerPackedInput>()
                        .context("slot is not a packed matrix")?
                        .clone()
                });
                PackedMatrixStorage::new_batched(s.batch_shape(), values)
                    .into_tensor(t.datum_type())
            }
            (None, Built::Plain(tensor)) => tensor,
            _ => bail!("node {node}: slot and data differ in form"),
        };
        let tensor = Arc::new(tensor);
        let konst = Const::new_with_opt_exotic_fact(tensor.clone(), exotic)?;
        n.op = Box::new(konst);
        n.outputs[0].fact.konst = Some(tensor);
        return Ok(());
    }
    let Built::Packed(blob) = data else {
        bail!("node {node}: a plain tensor for a matmul");
    };
    let mm = n
        .op_as_mut::<OptMatMul>()
        .context("slot in a node holding no weights")?;
    let mut seen = 0;
    for op in &mut mm.micro_ops {
        if let ProtoFusedSpec::AddMatMul { a, b, .. } = op {
            for operand in [a, b] {
                if let MatMulOperand::Const(v) = operand {
                    if seen == holder {
                        let old = v
                            .downcast_ref::<EagerPackedInput>()
                            .context("slot is not a packed matrix")?;
                        *v = Box::new(EagerPackedInput {
                            packed: Arc::new(blob),
                            ..old.clone()
                        });
                        return Ok(());
                    }
                    seen += 1;
                }
            }
        }
    }
    bail!("node {node}: no weight {holder}")
}

/// Byte ranges of a packed matrix that packing never writes: each panel's end padding
/// records and alignment. tract leaves them uninitialised (its kernels read past the last
/// record, never using what they find), so two loads of one layer differ there.
fn unwritten(p: &EagerPackedInput) -> Vec<std::ops::Range<usize>> {
    let Some(format) = p.fact.format.downcast_ref::<PackedFormat>() else {
        return vec![];
    };
    let written = p.fact.k * format.r * format.dt.size_of();
    let len = p.packed.len();
    if p.panel_bytes <= written {
        return vec![];
    }
    (0..len.div_ceil(p.panel_bytes))
        .map(|q| (q * p.panel_bytes + written).min(len)..((q + 1) * p.panel_bytes).min(len))
        .filter(|r| !r.is_empty())
        .collect()
}

/// Zeroes what packing left uninitialised in the packed weights of `model` (as tract's
/// debug builds do), so that two loads of a layer are the same plan byte for byte.
fn canonicalise(model: &mut TypedModel) -> Result<()> {
    for id in 0..model.nodes.len() {
        let mut zeroed = vec![];
        for (h, data) in holders(&model.nodes[id])?.iter().enumerate() {
            let Data::Packed(p) = data else { continue };
            let gaps = unwritten(p);
            let bytes = p.packed.as_bytes();
            if gaps
                .iter()
                .all(|g| bytes[g.clone()].iter().all(|&b| b == 0))
            {
                continue;
            }
            let mut blob = (*p.packed).clone();
            for g in gaps {
                blob.as_bytes_mut()[g].fill(0);
            }
            zeroed.push((h, blob));
        }
        for (h, blob) in zeroed {
            install(model, id, h, Built::Packed(blob))?;
        }
    }
    Ok(())
}

fn words(data: &Data) -> Result<Vec<u32>> {
    let bytes = match data {
        Data::Plain(t) => {
            ensure!(t.datum_type() == f32::datum_type(), "not f32");
            t.try_as_plain_ram()?.as_bytes()
        }
        Data::Packed(p) => p.packed.as_bytes(),
    };
    ensure!(bytes.len() % 4 == 0, "not whole f32 words");
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// What the tagged plan says of each node's weight data: the slots (data holding a tag,
/// with their recipes, literals read off the tagged plan) and a hash of every other data,
/// which must come out the same in the real plan.
struct Reading {
    nodes: usize,
    slots: Vec<Slot>,
    others: Vec<(usize, usize, u64)>,
}

fn read_tagged(tagged: &TypedModel, sources: usize) -> Result<Reading> {
    let mut slots = vec![];
    let mut others = vec![];
    for node in &tagged.nodes {
        for (holder, data) in holders(node)?.iter().enumerate() {
            let words = words(data).unwrap_or_default();
            let tags = words.iter().any(|&w| {
                let v = f32::from_bits(w);
                v >= super::recipe::CODE_BASE && v < super::recipe::CODE_BASE + sources as f32
            });
            if !tags {
                others.push((node.id, holder, data_hash(data)?));
                continue;
            }
            let recipe = Recipe::decode(&words, &words, sources).context("weights of no size")?;
            let form = match data {
                Data::Plain(t) => Form::Plain(t.shape().into()),
                Data::Packed(p) => Form::Packed {
                    bytes: p.packed.layout().size(),
                    align: p.packed.layout().align(),
                },
            };
            slots.push(Slot {
                node: node.id,
                holder,
                form,
                recipe,
            });
        }
    }
    Ok(Reading {
        nodes: tagged.nodes.len(),
        slots,
        others,
    })
}

fn data_hash(data: &Data) -> Result<u64> {
    Ok(match data {
        Data::Plain(t) => {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            t.hash(&mut h);
            h.finish()
        }
        Data::Packed(p) => {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            p.hash(&mut h);
            h.finish()
        }
    })
}

/// Checks the real plan against what the tagged one said: same nodes, the same data
/// where no weight goes, and each slot's recipe giving the real data from the file.
fn check_real(real: &TypedModel, reading: &Reading, file: &[u8]) -> Result<()> {
    ensure!(
        real.nodes.len() == reading.nodes,
        "the tagged plan has {} nodes, the real one {}",
        reading.nodes,
        real.nodes.len()
    );
    for &(node, holder, hash) in &reading.others {
        let data = holders(real.node(node))?;
        let d = data.get(holder).context("weights differ")?;
        ensure!(
            data_hash(d)? == hash,
            "node {}: a tensor made from the weights without their tags",
            real.node(node).name
        );
    }
    for s in &reading.slots {
        let data = holders(real.node(s.node))?;
        let d = data.get(s.holder).context("weights differ")?;
        ensure!(
            s.recipe.matches(file, &words(d)?)?,
            "node {}: the weights rebuilt differ from the full load's",
            real.node(s.node).name
        );
    }
    Ok(())
}

/// Plans layer `index` once from tagged weights, once for real, makes the template, and
/// keeps it only if every weight tensor its recipes rebuild from the file is the real
/// plan's, bit for bit. Returns the real layer, and the template or why there is none.
/// Its peak is a full load's: the tagged plan is dropped before the real one is made, and
/// the check reads the file again beside the real plan without building a second one.
pub fn load_with_template(
    pkg: &Package,
    index: usize,
    phases: &mut LoadPhases,
) -> Result<(LoadedLayer, Result<LayerTemplate>)> {
    let ctx = || format!("{}: layer {index}", pkg.name());
    // The tagged plan is read and dropped before the real one is made: the peak is one
    // plan's, as for a full load.
    let reading = tagged_plan(pkg, index).and_then(|(tagged, sources)| {
        let reading = read_tagged(&tagged, pkg_words(pkg, index)?)?;
        Ok((reading, sources))
    });
    let t = Instant::now();
    let (bytes, graph) = pkg.read_layer(index)?;
    drop(graph);
    phases.read += t.elapsed();
    let t = Instant::now();
    let mut real = parse(Vec::from(bytes)).with_context(ctx)?;
    phases.parse += t.elapsed();
    optimise(&mut real, phases).with_context(ctx)?;
    let template = reading.and_then(|(reading, sources)| {
        canonicalise(&mut real)?;
        let (bytes, graph) = pkg.read_layer(index)?;
        drop(graph);
        check_real(&real, &reading, &bytes)?;
        for s in &reading.slots {
            log::trace!(
                "{}: node {} weight {}: {} values in {} blocks",
                ctx(),
                s.node,
                s.holder,
                s.form.bytes() / 4,
                s.recipe.blocks()
            );
        }
        // What the graph's copy keeps on its own, measured; the constants it shares with
        // the real plan stay when the plan goes, so they are counted too.
        let (graph, own) = crate::memory::heap::kept_by(|| -> Result<TypedModel> {
            let mut graph = real.clone();
            for s in &reading.slots {
                let empty = match s.form {
                    Form::Plain(_) => Built::Plain(Tensor::zero::<f32>(&[0])?),
                    Form::Packed { .. } => Built::Packed(Blob::default()),
                };
                install(&mut graph, s.node, s.holder, empty)?;
            }
            Ok(graph)
        });
        let graph = graph?;
        let mut template = LayerTemplate {
            bytes: 0,
            file_bytes: bytes.len(),
            fingerprint: fingerprint(&bytes, &sources),
            slots: reading.slots,
            sources,
            graph,
        };
        template.bytes = own
            + constant_bytes(&template.graph)
            + template.recipe_bytes()
            + (template.sources.len() * std::mem::size_of::<Source>()) as u64;
        Ok(template)
    });
    let t = Instant::now();
    let plan = Plan::from_model(real).with_context(ctx)?;
    phases.plan += t.elapsed();
    Ok((LoadedLayer { index, plan }, template.with_context(ctx)))
}

/// Reloads layer `index` through its template: the file read and checked as for a full
/// load, its weights gathered into the plan's tensors.
pub fn reload(
    pkg: &Package,
    index: usize,
    template: &LayerTemplate,
    phases: &mut LoadPhases,
) -> Result<LoadedLayer> {
    let graph = rebuild(pkg, index, template, phases)
        .with_context(|| format!("{}: layer {index}", pkg.name()))?;
    let t = Instant::now();
    let plan = Plan::from_model(graph)?;
    phases.plan += t.elapsed();
    Ok(LoadedLayer { index, plan })
}

/// The optimised graph of layer `index`, from its template and its file.
pub(super) fn rebuild(
    pkg: &Package,
    index: usize,
    template: &LayerTemplate,
    phases: &mut LoadPhases,
) -> Result<TypedModel> {
    let t = Instant::now();
    let bytes = pkg.read_layer_bytes(index)?;
    ensure!(
        bytes.len() == template.file_bytes
            && fingerprint(&bytes, &template.sources) == template.fingerprint,
        "the layer file changed since its template was made"
    );
    phases.read += t.elapsed();
    let t = Instant::now();
    let mut graph = template.graph.clone();
    for s in &template.slots {
        let data = match &s.form {
            Form::Plain(shape) => {
                let mut tensor = Tensor::zero_aligned::<f32>(shape, vector_size())?;
                s.recipe.apply(
                    &bytes,
                    tensor.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
                )?;
                Built::Plain(tensor)
            }
            Form::Packed { bytes: size, align } => {
                let mut tensor = Tensor::zero_aligned::<f32>(&[size / 4], *align)?;
                s.recipe.apply(
                    &bytes,
                    tensor.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
                )?;
                Built::Packed(tensor.into_blob()?)
            }
        };
        install(&mut graph, s.node, s.holder, data)?;
    }
    phases.optimize += t.elapsed();
    Ok(graph)
}

/// A hash of the file's bytes outside the tagged weights (sorted by offset).
fn fingerprint(bytes: &[u8], sources: &[Source]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut at = 0;
    let mut sorted: Vec<&Source> = sources.iter().collect();
    sorted.sort_by_key(|s| s.offset);
    for s in sorted {
        h.write(bytes.get(at..s.offset).unwrap_or_default());
        at = s.offset + s.len * 4;
    }
    h.write(bytes.get(at..).unwrap_or_default());
    h.finish()
}

/// The layer planned from tagged weights (each f32 weight replaced by the tag of its
/// word in the file), with where those weights lie.
fn tagged_plan(pkg: &Package, index: usize) -> Result<(TypedModel, Vec<Source>)> {
    let (bytes, graph) = pkg.read_layer(index)?;
    // Where each f32 constant's data lies in the file (the graph shares the buffer), and a
    // hash of it: tract gets the buffer itself, and its constants must be found again.
    let base = bytes.as_ptr() as usize;
    let located: Vec<(String, Source, u64)> = graph
        .tensors
        .iter()
        .filter(|t| t.dtype == DType::F32)
        .filter_map(|t| {
            let d = t.data.as_ref()?;
            // Data decoded at read time (not a slice of the file) has no place in it.
            let offset = (d.as_ptr() as usize).checked_sub(base)?;
            let inside = offset + d.len() <= bytes.len() && offset % 4 == 0 && d.len() % 4 == 0;
            let source = Source {
                offset,
                len: d.len() / 4,
            };
            inside.then(|| (t.name.clone(), source, hash(d)))
        })
        .collect();
    drop(graph);
    ensure!(bytes.len() / 4 <= MAX_CODES, "too large a file to tag");
    let mut model = parse(Vec::from(bytes))?;
    let mut sources = vec![];
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        let Some(k) = node.op_as::<Const>() else {
            continue;
        };
        let t = k.val();
        // Uniform tensors stay real: tract simplifies by their value (adding zero,
        // multiplying by one), and the real plan must have the same graph.
        if t.datum_type() != f32::datum_type() || !t.is_plain() || t.len() < 2 || t.is_uniform() {
            continue;
        }
        let data = t.try_as_plain_ram()?.as_bytes();
        let &(_, source, _) = located
            .iter()
            .find(|(name, s, h)| *name == node.name && s.len * 4 == data.len() && *h == hash(data))
            .with_context(|| format!("constant {} not found in the file", node.name))?;
        let codes: Vec<f32> = (source.offset / 4..source.offset / 4 + source.len)
            .map(code)
            .collect();
        let tagged = Const::new(Arc::new(Tensor::from_shape(t.shape(), &codes)?))?;
        let fact = tagged.output_facts(&[])?.remove(0);
        let node = model.node_mut(id);
        node.op = Box::new(tagged);
        node.outputs[0].fact = fact;
        sources.push(source);
    }
    optimise(&mut model, &mut LoadPhases::default())?;
    canonicalise(&mut model)?;
    Ok((model, sources))
}

/// Words of layer `index`'s file (the range of tags).
fn pkg_words(pkg: &Package, index: usize) -> Result<usize> {
    Ok(pkg.manifest.layers[index].file_bytes as usize / 4)
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

impl LoadedLayer {
    /// Where this layer's plan differs from `other`'s (nodes, wiring, ops with their
    /// weights compared by value, facts), if it does: a reload must give a full load's plan.
    pub fn plan_difference(&self, other: &LoadedLayer) -> Option<String> {
        first_difference(self.plan.model(), other.plan.model())
    }
}

/// Where two optimised graphs differ as plans (nodes, wiring, ops with their weights
/// compared by value, facts), if they do.
fn first_difference(a: &TypedModel, b: &TypedModel) -> Option<String> {
    if a.nodes.len() != b.nodes.len() || a.inputs != b.inputs || a.outputs != b.outputs {
        return Some("nodes, inputs or outputs".into());
    }
    for (x, y) in a.nodes.iter().zip(&b.nodes) {
        let what = if x.name != y.name || x.inputs != y.inputs {
            "name or inputs"
        } else if *x.op != *y.op {
            "op"
        } else if x.outputs.len() != y.outputs.len()
            || x.outputs
                .iter()
                .zip(&y.outputs)
                .any(|(p, q)| p.fact != q.fact || p.successors != q.successors)
        {
            "outputs"
        } else {
            continue;
        };
        return Some(format!("node {} ({}): {what}", y.name, y.op.name()));
    }
    None
}
