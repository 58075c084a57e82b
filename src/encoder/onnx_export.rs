//! Export of a [`Bert`] to an ONNX graph (opset 17) that ONNX Runtime runs: inputs input_ids and
//! attention_mask (int64, batch x tokens), output last_hidden_state (float, batch x tokens x
//! hidden). The protobuf is written by hand; the graph uses standard ops only (Gather,
//! LayerNormalization, MatMul, Softmax, Erf, ...).

use std::path::Path;

use candle_core::Tensor;

use super::{Bert, EncoderError};

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
const INT64: i64 = 7;

enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
}

struct Graph {
    nodes: Vec<Proto>,
    initializers: Vec<Proto>,
    counter: usize,
}

impl Graph {
    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.node_to(op, inputs, attrs, out)
    }

    fn node_to(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: &[(&str, Attr)],
        out: String,
    ) -> String {
        let mut n = Proto::default();
        for i in inputs {
            n.string(1, i);
        }
        n.string(2, &out).string(3, &out).string(4, op);
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
        out
    }

    fn initializer(&mut self, name: &str, dims: &[usize], data_type: i64, raw: &[u8]) -> String {
        let mut t = Proto::default();
        for d in dims {
            t.int(1, *d as i64);
        }
        t.int(2, data_type).string(8, name).bytes(9, raw);
        self.initializers.push(t);
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

/// Writes `model` as an ONNX file at `path`.
pub fn export_onnx(model: &Bert, path: &Path) -> Result<(), EncoderError> {
    let c = model.config();
    let (h, heads, hd) = (
        c.hidden_size as i64,
        c.num_attention_heads as i64,
        c.head_dim() as i64,
    );
    let eps = c.layer_norm_eps as f32;
    let weights: std::collections::HashMap<String, Tensor> = model
        .params()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    let mut g = Graph {
        nodes: Vec::new(),
        initializers: Vec::new(),
        counter: 0,
    };
    let w = |g: &mut Graph, name: &str| -> Result<String, EncoderError> {
        g.float_tensor(name, &weights[name])
    };
    // Linear layers store W^T so the graph multiplies without a Transpose.
    let linear = |g: &mut Graph, x: &str, prefix: &str| -> Result<String, EncoderError> {
        let wt = weights[&format!("{prefix}.weight")].t()?.contiguous()?;
        let wt = g.float_tensor(&format!("{prefix}.weight_t"), &wt)?;
        let b = w(g, &format!("{prefix}.bias"))?;
        let y = g.node("MatMul", &[x, &wt], &[]);
        Ok(g.node("Add", &[&y, &b], &[]))
    };
    let norm = |g: &mut Graph, x: &str, prefix: &str| -> Result<String, EncoderError> {
        let (s, b) = (
            w(g, &format!("{prefix}.weight"))?,
            w(g, &format!("{prefix}.bias"))?,
        );
        Ok(g.node(
            "LayerNormalization",
            &[x, &s, &b],
            &[("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))],
        ))
    };

    // Embeddings: words + positions 0..T + token type 0.
    let word_table = w(&mut g, "embeddings.word_embeddings.weight")?;
    let pos_table = w(&mut g, "embeddings.position_embeddings.weight")?;
    let type0 = weights["embeddings.token_type_embeddings.weight"].narrow(0, 0, 1)?;
    let type0 = g.float_tensor("token_type_0", &type0)?;
    let words = g.node("Gather", &[&word_table, "input_ids"], &[]);
    let shape = g.node("Shape", &["input_ids"], &[]);
    let one_index = g.int64s("const_index_1", &[1], true);
    let seq_len = g.node("Gather", &[&shape, &one_index], &[("axis", Attr::Int(0))]);
    let zero = g.int64s("const_zero", &[0], true);
    let one = g.int64s("const_one", &[1], true);
    let positions = g.node("Range", &[&zero, &seq_len, &one], &[]);
    let pos = g.node("Gather", &[&pos_table, &positions], &[]);
    let x = g.node("Add", &[&words, &pos], &[]);
    let x = g.node("Add", &[&x, &type0], &[]);
    let mut x = norm(&mut g, &x, "embeddings.LayerNorm")?;

    // Additive attention bias (B, 1, 1, T): 0 attended, -1e9 padded.
    let mask = g.node("Cast", &["attention_mask"], &[("to", Attr::Int(FLOAT))]);
    let one_f = g.scalar("const_one_f", 1.0);
    let big = g.scalar("const_mask_scale", 1e9);
    let mask = g.node("Sub", &[&mask, &one_f], &[]);
    let mask = g.node("Mul", &[&mask, &big], &[]);
    let axes = g.int64s("const_axes_1_2", &[1, 2], false);
    let bias = g.node("Unsqueeze", &[&mask, &axes], &[]);

    let heads_shape = g.int64s("const_heads_shape", &[0, 0, heads, hd], false);
    let merge_shape = g.int64s("const_merge_shape", &[0, 0, h], false);
    let scale = g.scalar("const_attention_scale", 1.0 / (hd as f32).sqrt());
    let sqrt2 = g.scalar("const_sqrt2", std::f32::consts::SQRT_2);
    let half = g.scalar("const_half", 0.5);
    for i in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        let split = |g: &mut Graph, name: &str, perm: &[i64]| -> Result<String, EncoderError> {
            let y = linear(g, &x, &format!("{p}.attention.self.{name}"))?;
            let y = g.node("Reshape", &[&y, &heads_shape], &[]);
            Ok(g.node("Transpose", &[&y], &[("perm", Attr::Ints(perm.to_vec()))]))
        };
        let q = split(&mut g, "query", &[0, 2, 1, 3])?;
        let k = split(&mut g, "key", &[0, 2, 3, 1])?;
        let v = split(&mut g, "value", &[0, 2, 1, 3])?;
        let scores = g.node("MatMul", &[&q, &k], &[]);
        let scores = g.node("Mul", &[&scores, &scale], &[]);
        let scores = g.node("Add", &[&scores, &bias], &[]);
        let probs = g.node("Softmax", &[&scores], &[("axis", Attr::Int(-1))]);
        let context = g.node("MatMul", &[&probs, &v], &[]);
        let context = g.node(
            "Transpose",
            &[&context],
            &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let context = g.node("Reshape", &[&context, &merge_shape], &[]);
        let a = linear(&mut g, &context, &format!("{p}.attention.output.dense"))?;
        let a = g.node("Add", &[&a, &x], &[]);
        let a = norm(&mut g, &a, &format!("{p}.attention.output.LayerNorm"))?;
        let inter = linear(&mut g, &a, &format!("{p}.intermediate.dense"))?;
        let act = match c.hidden_act.as_str() {
            // gelu(x) = 0.5 x (1 + erf(x / sqrt 2))
            "gelu" => {
                let scaled = g.node("Div", &[&inter, &sqrt2], &[]);
                let erf = g.node("Erf", &[&scaled], &[]);
                let erf1 = g.node("Add", &[&erf, &one_f], &[]);
                let prod = g.node("Mul", &[&inter, &erf1], &[]);
                g.node("Mul", &[&prod, &half], &[])
            }
            "relu" => g.node("Relu", &[&inter], &[]),
            other => {
                return Err(EncoderError::Onnx(format!(
                    "export of hidden_act `{other}` is not supported"
                )));
            }
        };
        let o = linear(&mut g, &act, &format!("{p}.output.dense"))?;
        let o = g.node("Add", &[&o, &a], &[]);
        x = norm(&mut g, &o, &format!("{p}.output.LayerNorm"))?;
    }
    g.node_to("Identity", &[&x], &[], "last_hidden_state".to_string());

    let mut graph = Proto::default();
    for n in &g.nodes {
        graph.message(1, n);
    }
    graph.string(2, "synthrank_bert");
    for t in &g.initializers {
        graph.message(5, t);
    }
    graph.message(11, &value_info("input_ids", INT64, &["batch", "tokens"]));
    graph.message(
        11,
        &value_info("attention_mask", INT64, &["batch", "tokens"]),
    );
    let hidden = h.to_string();
    graph.message(
        12,
        &value_info("last_hidden_state", FLOAT, &["batch", "tokens", &hidden]),
    );
    let mut opset = Proto::default();
    opset.string(1, "").int(2, 17);
    let mut model_proto = Proto::default();
    model_proto
        .int(1, 8)
        .string(2, "synthrank")
        .string(3, env!("CARGO_PKG_VERSION"))
        .message(7, &graph)
        .message(8, &opset);
    let tmp = path.with_extension("onnx.tmp");
    std::fs::write(&tmp, &model_proto.0).map_err(|e| EncoderError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| EncoderError::io(path, e))
}
