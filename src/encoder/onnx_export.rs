//! Export of a [`Bert`] to an ONNX graph (opset 17): inputs input_ids and attention_mask (int64,
//! batch x tokens), output last_hidden_state (float, batch x tokens x hidden). The protobuf is
//! written by hand. Three flavors ([`OnnxOps`]): standard ops only (Gather, LayerNormalization,
//! MatMul, Softmax, Erf, ...), which any ONNX runtime runs; ONNX Runtime's fused contrib ops
//! (com.microsoft Attention, SkipLayerNormalization, BiasGelu), which its optimizer does not
//! derive from the standard graph and which make its CPU inference about 8% faster here; and
//! the same with 8-bit weights (QAttention, DynamicQuantizeMatMul), faster again but no longer
//! the same embeddings.

use std::path::Path;

use candle_core::Tensor;

use super::{Bert, BertConfig, EncoderError};

/// Minimal protobuf encoding: the wire types ONNX's messages use.
#[derive(Default)]
struct Proto(Vec<u8>);

impl Proto {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }
    fn int(&mut self, field: u32, v: i64) -> &mut Self {
        self.key(field, 0);
        self.varint(v as u64);
        self
    }
    fn float(&mut self, field: u32, v: f32) -> &mut Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, field: u32, v: &[u8]) -> &mut Self {
        self.key(field, 2);
        self.varint(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
    fn string(&mut self, field: u32, v: &str) -> &mut Self {
        self.bytes(field, v.as_bytes())
    }
    fn message(&mut self, field: u32, m: &Proto) -> &mut Self {
        self.bytes(field, &m.0)
    }
}

const FLOAT: i64 = 1;
const INT8: i64 = 3;
const INT32: i64 = 6;
const INT64: i64 = 7;
const CONTRIB: &str = "com.microsoft";

/// Which operators the exported graph may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnnxOps {
    /// ONNX standard ops only: portable to any runtime.
    Standard,
    /// ONNX Runtime's fused contrib ops: the fast path of the `embed` stage's onnx backend.
    OnnxRuntime,
    /// ONNX Runtime's contrib ops with the weights of every matrix product as 8-bit integers
    /// (per output column, symmetric) and activations quantized per tensor at run time: an
    /// approximation of the model, opted into for speed.
    OnnxRuntimeInt8,
}

impl OnnxOps {
    /// Names the flavor in cached export file names, so a cache never serves another one.
    pub fn tag(self) -> &'static str {
        match self {
            OnnxOps::Standard => "std",
            OnnxOps::OnnxRuntime => "ort",
            OnnxOps::OnnxRuntimeInt8 => "ort-int8",
        }
    }

    fn fused(self) -> bool {
        self != OnnxOps::Standard
    }
}

/// Weight magnitudes of the 8-bit flavor: at most 64, so that on CPUs without VNNI the
/// unsigned-activation by signed-weight byte products (`vpmaddubsw`), summed in pairs in 16
/// bits, cannot saturate: 2 · 255 · 64 < 2¹⁵. ONNX Runtime's own quantizer calls this
/// `reduce_range`.
const WEIGHT_LEVELS: f32 = 64.0;

/// `w` (in x out) as integers per output column: w ≈ q · scale[column].
fn quantize_columns(w: &Tensor) -> Result<(Vec<u8>, Vec<f32>), EncoderError> {
    let (rows, cols) = w.dims2()?;
    let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
    let scales: Vec<f32> = (0..cols)
        .map(|c| {
            let max = (0..rows).fold(0f32, |m, r| m.max(values[r * cols + c].abs()));
            if max > 0.0 { max / WEIGHT_LEVELS } else { 1.0 }
        })
        .collect();
    let ints = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let q = (v / scales[i % cols])
                .round()
                .clamp(-WEIGHT_LEVELS, WEIGHT_LEVELS);
            (q as i8) as u8
        })
        .collect();
    Ok((ints, scales))
}

enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
}

struct Graph {
    nodes: Vec<Proto>,
    /// By name; written only if a node reads them.
    initializers: Vec<(String, Proto)>,
    inputs_read: std::collections::HashSet<String>,
    counter: usize,
}

impl Graph {
    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.node_to("", op, inputs, attrs, out)
    }

    fn contrib(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.node_to(CONTRIB, op, inputs, attrs, out)
    }

    fn node_to(
        &mut self,
        domain: &str,
        op: &str,
        inputs: &[&str],
        attrs: &[(&str, Attr)],
        out: String,
    ) -> String {
        self.node_with_outputs(domain, op, inputs, attrs, std::slice::from_ref(&out));
        out
    }

    /// A node with several outputs (named by the caller).
    fn node_with_outputs(
        &mut self,
        domain: &str,
        op: &str,
        inputs: &[&str],
        attrs: &[(&str, Attr)],
        outputs: &[String],
    ) {
        let mut n = Proto::default();
        for i in inputs {
            n.string(1, i);
            self.inputs_read.insert(i.to_string());
        }
        for o in outputs {
            n.string(2, o);
        }
        n.string(3, &outputs[0]).string(4, op);
        if !domain.is_empty() {
            n.string(7, domain);
        }
        for (name, value) in attrs {
            let mut a = Proto::default();
            a.string(1, name);
            match value {
                Attr::Int(v) => {
                    a.int(3, *v).int(20, 2);
                }
                Attr::Float(v) => {
                    a.float(2, *v).int(20, 1);
                }
                Attr::Ints(vs) => {
                    for v in vs {
                        a.int(8, *v);
                    }
                    a.int(20, 7);
                }
            }
            n.message(5, &a);
        }
        self.nodes.push(n);
    }

    fn initializer(&mut self, name: &str, dims: &[usize], data_type: i64, raw: &[u8]) -> String {
        let mut t = Proto::default();
        for d in dims {
            t.int(1, *d as i64);
        }
        t.int(2, data_type).string(8, name).bytes(9, raw);
        self.initializers.push((name.to_string(), t));
        name.to_string()
    }

    fn float_tensor(&mut self, name: &str, tensor: &Tensor) -> Result<String, EncoderError> {
        let data: Vec<f32> = tensor.flatten_all()?.to_vec1()?;
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(self.initializer(name, tensor.dims(), FLOAT, &raw))
    }

    fn int64s(&mut self, name: &str, values: &[i64], scalar: bool) -> String {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let dims = if scalar { vec![] } else { vec![values.len()] };
        self.initializer(name, &dims, INT64, &raw)
    }

    fn scalar(&mut self, name: &str, v: f32) -> String {
        self.initializer(name, &[], FLOAT, &v.to_le_bytes())
    }
}

fn value_info(name: &str, elem_type: i64, dims: &[&str]) -> Proto {
    let mut shape = Proto::default();
    for d in dims {
        let mut dim = Proto::default();
        match d.parse::<i64>() {
            Ok(size) => dim.int(1, size),
            Err(_) => dim.string(2, d),
        };
        shape.message(1, &dim);
    }
    let mut tensor_type = Proto::default();
    tensor_type.int(1, elem_type).message(2, &shape);
    let mut type_proto = Proto::default();
    type_proto.message(1, &tensor_type);
    let mut info = Proto::default();
    info.string(1, name).message(2, &type_proto);
    info
}

/// The weights by parameter name, and the graph being built from them in flavor `ops`.
struct Builder {
    g: Graph,
    ops: OnnxOps,
    weights: std::collections::HashMap<String, Tensor>,
    eps: f32,
}

impl Builder {
    fn weight(&mut self, name: &str) -> Result<String, EncoderError> {
        self.g.float_tensor(name, &self.weights[name])
    }

    /// x W^T without the bias; the weight is stored transposed so no Transpose runs (and as
    /// 8-bit integers in the 8-bit flavor).
    fn matmul(&mut self, x: &str, prefix: &str) -> Result<String, EncoderError> {
        let wt = self.weights[&format!("{prefix}.weight")]
            .t()?
            .contiguous()?;
        let name = format!("{prefix}.weight_t");
        if self.ops == OnnxOps::OnnxRuntimeInt8 {
            let (wt, scale) = self.quantized(&name, &wt)?;
            return Ok(self
                .g
                .contrib("DynamicQuantizeMatMul", &[x, &wt, &scale], &[]));
        }
        let wt = self.g.float_tensor(&name, &wt)?;
        Ok(self.g.node("MatMul", &[x, &wt], &[]))
    }

    /// Initializers of `w` (in x out) quantized per column: the integers and the scales.
    fn quantized(&mut self, name: &str, w: &Tensor) -> Result<(String, String), EncoderError> {
        let (ints, scales) = quantize_columns(w)?;
        let raw: Vec<u8> = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
        let scale = self
            .g
            .initializer(&format!("{name}.scale"), &[scales.len()], FLOAT, &raw);
        let ints = self
            .g
            .initializer(&format!("{name}.int8"), w.dims(), INT8, &ints);
        Ok((ints, scale))
    }

    fn linear(&mut self, x: &str, prefix: &str) -> Result<String, EncoderError> {
        let y = self.matmul(x, prefix)?;
        let b = self.weight(&format!("{prefix}.bias"))?;
        Ok(self.g.node("Add", &[&y, &b], &[]))
    }

    fn layer_norm(&mut self, x: &str, prefix: &str) -> Result<String, EncoderError> {
        let s = self.weight(&format!("{prefix}.weight"))?;
        let b = self.weight(&format!("{prefix}.bias"))?;
        let eps = Attr::Float(self.eps);
        Ok(self.g.node(
            "LayerNormalization",
            &[x, &s, &b],
            &[("axis", Attr::Int(-1)), ("epsilon", eps)],
        ))
    }

    /// LayerNorm(x W^T + bias + residual), the close of both sub-blocks of a layer.
    fn dense_residual_norm(
        &mut self,
        x: &str,
        residual: &str,
        dense: &str,
        norm: &str,
    ) -> Result<String, EncoderError> {
        match self.ops {
            OnnxOps::Standard => {
                let y = self.linear(x, dense)?;
                let y = self.g.node("Add", &[&y, residual], &[]);
                self.layer_norm(&y, norm)
            }
            OnnxOps::OnnxRuntime | OnnxOps::OnnxRuntimeInt8 => {
                let y = self.matmul(x, dense)?;
                let s = self.weight(&format!("{norm}.weight"))?;
                let b = self.weight(&format!("{norm}.bias"))?;
                let bias = self.weight(&format!("{dense}.bias"))?;
                let eps = Attr::Float(self.eps);
                Ok(self.g.contrib(
                    "SkipLayerNormalization",
                    &[&y, residual, &s, &b, &bias],
                    &[("epsilon", eps)],
                ))
            }
        }
    }
}

/// Graph constants shared by every layer.
struct Constants {
    one_f: String,
    heads_shape: String,
    merge_shape: String,
    attention_scale: String,
    sqrt2: String,
    half: String,
}

impl Builder {
    /// Words + positions 0..T (a slice of the table) + token type 0, layer-normalized.
    fn embeddings(&mut self) -> Result<String, EncoderError> {
        let word_table = self.weight("embeddings.word_embeddings.weight")?;
        let pos_table = self.weight("embeddings.position_embeddings.weight")?;
        let type0 = self.weights["embeddings.token_type_embeddings.weight"].narrow(0, 0, 1)?;
        let type0 = self.g.float_tensor("token_type_0", &type0)?;
        let g = &mut self.g;
        let words = g.node("Gather", &[&word_table, "input_ids"], &[]);
        let shape = g.node("Shape", &["input_ids"], &[]);
        let (zero, one, two) = (
            g.int64s("const_0", &[0], false),
            g.int64s("const_1", &[1], false),
            g.int64s("const_2", &[2], false),
        );
        let seq_len = g.node("Slice", &[&shape, &one, &two], &[]);
        let pos = g.node("Slice", &[&pos_table, &zero, &seq_len, &zero], &[]);
        let x = g.node("Add", &[&words, &pos], &[]);
        let x = g.node("Add", &[&x, &type0], &[]);
        self.layer_norm(&x, "embeddings.LayerNorm")
    }

    fn constants(&mut self, c: &BertConfig) -> Constants {
        let (h, heads, hd) = (
            c.hidden_size as i64,
            c.num_attention_heads as i64,
            c.head_dim() as i64,
        );
        let g = &mut self.g;
        Constants {
            one_f: g.scalar("const_one_f", 1.0),
            heads_shape: g.int64s("const_heads_shape", &[0, 0, heads, hd], false),
            merge_shape: g.int64s("const_merge_shape", &[0, 0, h], false),
            attention_scale: g.scalar("const_attention_scale", 1.0 / (hd as f32).sqrt()),
            sqrt2: g.scalar("const_sqrt2", std::f32::consts::SQRT_2),
            half: g.scalar("const_half", 0.5),
        }
    }

    fn attention_mask(&mut self, k: &Constants) -> String {
        let g = &mut self.g;
        match self.ops {
            // Additive attention bias (B, 1, 1, T): 0 attended, -1e9 padded.
            OnnxOps::Standard => {
                let mask = g.node("Cast", &["attention_mask"], &[("to", Attr::Int(FLOAT))]);
                let big = g.scalar("const_mask_scale", 1e9);
                let mask = g.node("Sub", &[&mask, &k.one_f], &[]);
                let mask = g.node("Mul", &[&mask, &big], &[]);
                let axes = g.int64s("const_axes_1_2", &[1, 2], false);
                g.node("Unsqueeze", &[&mask, &axes], &[])
            }
            // The contrib Attention takes the raw 0/1 mask as int32 (B, T).
            OnnxOps::OnnxRuntime | OnnxOps::OnnxRuntimeInt8 => {
                g.node("Cast", &["attention_mask"], &[("to", Attr::Int(INT32))])
            }
        }
    }

    /// Self-attention of layer `p` over `x`: the context before the output projection.
    fn self_attention(
        &mut self,
        x: &str,
        p: &str,
        mask: &str,
        heads: i64,
        k: &Constants,
    ) -> Result<String, EncoderError> {
        if self.ops == OnnxOps::Standard {
            let mut split = |name: &str, perm: &[i64]| -> Result<String, EncoderError> {
                let y = self.linear(x, &format!("{p}.attention.self.{name}"))?;
                let y = self.g.node("Reshape", &[&y, &k.heads_shape], &[]);
                Ok(self
                    .g
                    .node("Transpose", &[&y], &[("perm", Attr::Ints(perm.to_vec()))]))
            };
            let q = split("query", &[0, 2, 1, 3])?;
            let key = split("key", &[0, 2, 3, 1])?;
            let v = split("value", &[0, 2, 1, 3])?;
            let g = &mut self.g;
            let scores = g.node("MatMul", &[&q, &key], &[]);
            let scores = g.node("Mul", &[&scores, &k.attention_scale], &[]);
            let scores = g.node("Add", &[&scores, mask], &[]);
            let probs = g.node("Softmax", &[&scores], &[("axis", Attr::Int(-1))]);
            let context = g.node("MatMul", &[&probs, &v], &[]);
            let perm = Attr::Ints(vec![0, 2, 1, 3]);
            let context = g.node("Transpose", &[&context], &[("perm", perm)]);
            return Ok(g.node("Reshape", &[&context, &k.merge_shape], &[]));
        }
        // Query, key and value projections as one (H, 3H) weight and (3H) bias.
        let names = ["query", "key", "value"].map(|n| format!("{p}.attention.self.{n}"));
        let w: Vec<Tensor> = names
            .iter()
            .map(|n| self.weights[&format!("{n}.weight")].t())
            .collect::<Result<_, _>>()?;
        let bias: Vec<&Tensor> = names
            .iter()
            .map(|n| &self.weights[&format!("{n}.bias")])
            .collect();
        let (w, w_name) = (Tensor::cat(&w, 1)?, format!("{p}.attention.qkv.weight_t"));
        let bias = self
            .g
            .float_tensor(&format!("{p}.attention.qkv.bias"), &Tensor::cat(&bias, 0)?)?;
        let num_heads = [("num_heads", Attr::Int(heads))];
        if self.ops == OnnxOps::OnnxRuntime {
            let w = self.g.float_tensor(&w_name, &w)?;
            return Ok(self
                .g
                .contrib("Attention", &[x, &w, &bias, mask], &num_heads));
        }
        // QAttention takes its input quantized: per tensor, at run time.
        let (w, w_scale) = self.quantized(&w_name, &w)?;
        let xq = ["quantized", "scale", "zero_point"].map(|s| self.g.fresh(s));
        self.g
            .node_with_outputs("", "DynamicQuantizeLinear", &[x], &[], &xq);
        let [xq, x_scale, x_zero] = xq;
        let inputs = [&*xq, &w, &bias, &x_scale, &w_scale, mask, &x_zero];
        Ok(self.g.contrib("QAttention", &inputs, &num_heads))
    }

    /// The intermediate dense layer of `inter` over `a` and its activation.
    fn intermediate(
        &mut self,
        a: &str,
        inter: &str,
        hidden_act: &str,
        k: &Constants,
    ) -> Result<String, EncoderError> {
        Ok(match (hidden_act, self.ops) {
            ("gelu", OnnxOps::OnnxRuntime | OnnxOps::OnnxRuntimeInt8) => {
                let y = self.matmul(a, inter)?;
                let bias = self.weight(&format!("{inter}.bias"))?;
                self.g.contrib("BiasGelu", &[&y, &bias], &[])
            }
            // gelu(x) = 0.5 x (1 + erf(x / sqrt 2))
            ("gelu", OnnxOps::Standard) => {
                let y = self.linear(a, inter)?;
                let g = &mut self.g;
                let scaled = g.node("Div", &[&y, &k.sqrt2], &[]);
                let erf = g.node("Erf", &[&scaled], &[]);
                let erf1 = g.node("Add", &[&erf, &k.one_f], &[]);
                let prod = g.node("Mul", &[&y, &erf1], &[]);
                g.node("Mul", &[&prod, &k.half], &[])
            }
            ("relu", _) => {
                let y = self.linear(a, inter)?;
                self.g.node("Relu", &[&y], &[])
            }
            (other, _) => {
                return Err(EncoderError::Onnx(format!(
                    "export of hidden_act `{other}` is not supported"
                )));
            }
        })
    }
}

/// Writes `model` as an ONNX file at `path`, with the operators `ops` allows.
pub fn export_onnx(model: &Bert, path: &Path, ops: OnnxOps) -> Result<(), EncoderError> {
    let c = model.config();
    let mut b = Builder {
        g: Graph {
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs_read: Default::default(),
            counter: 0,
        },
        ops,
        weights: model
            .params()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect(),
        eps: c.layer_norm_eps as f32,
    };
    let mut x = b.embeddings()?;
    let k = b.constants(c);
    let mask = b.attention_mask(&k);
    for i in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        let context = b.self_attention(&x, &p, &mask, c.num_attention_heads as i64, &k)?;
        let a = b.dense_residual_norm(
            &context,
            &x,
            &format!("{p}.attention.output.dense"),
            &format!("{p}.attention.output.LayerNorm"),
        )?;
        let act = b.intermediate(&a, &format!("{p}.intermediate.dense"), &c.hidden_act, &k)?;
        x = b.dense_residual_norm(
            &act,
            &a,
            &format!("{p}.output.dense"),
            &format!("{p}.output.LayerNorm"),
        )?;
    }
    b.g.node_to("", "Identity", &[&x], &[], "last_hidden_state".to_string());
    write_model(&b.g, c.hidden_size, ops, path)
}

/// The ONNX ModelProto around the graph, written atomically.
fn write_model(g: &Graph, hidden: usize, ops: OnnxOps, path: &Path) -> Result<(), EncoderError> {
    let mut graph = Proto::default();
    for n in &g.nodes {
        graph.message(1, n);
    }
    graph.string(2, "synthrank_bert");
    for (name, t) in &g.initializers {
        // Constants of the other flavors are not written (ONNX Runtime warns about them).
        if g.inputs_read.contains(name) {
            graph.message(5, t);
        }
    }
    graph.message(11, &value_info("input_ids", INT64, &["batch", "tokens"]));
    graph.message(
        11,
        &value_info("attention_mask", INT64, &["batch", "tokens"]),
    );
    let hidden = hidden.to_string();
    graph.message(
        12,
        &value_info("last_hidden_state", FLOAT, &["batch", "tokens", &hidden]),
    );
    let mut model_proto = Proto::default();
    model_proto
        .int(1, 8)
        .string(2, "synthrank")
        .string(3, env!("CARGO_PKG_VERSION"))
        .message(7, &graph);
    let mut opset = Proto::default();
    opset.string(1, "").int(2, 17);
    model_proto.message(8, &opset);
    if ops.fused() {
        let mut contrib = Proto::default();
        contrib.string(1, CONTRIB).int(2, 1);
        model_proto.message(8, &contrib);
    }
    let tmp = path.with_extension("onnx.tmp");
    std::fs::write(&tmp, &model_proto.0).map_err(|e| EncoderError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| EncoderError::io(path, e))
}
