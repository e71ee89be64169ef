//! The GGUF reader, its dequantizers and the Gemma GGUF loader.
//!
//! * golden blocks from gguf-py (scripts/fixtures/gguf_blocks.py) decode bit for bit;
//! * files written here byte by byte (a small GGUF writer below) exercise every metadata type,
//!   alignment, and every way a file can be broken;
//! * the tiny HF fixtures of scripts/fixtures/gemma_tiny.py, converted to GGUF here the way
//!   llama.cpp's converter does (llama.cpp names, reversed dims, norms stored as `w + 1`), give
//!   the HF reference logits.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use rupantor_model::gguf::{dequantize_blocks, GgufValueType, DEFAULT_ALIGNMENT};
use rupantor_model::{
    load_config, load_gemma, load_gemma_gguf_dense, load_model, ConfigError, DenseBuilder,
    GgmlType, GgufError, GgufFile, GgufGemma, GgufValue, LoadError, TensorSource,
};
use safetensors::{Dtype, SafeTensors};

// ------------------------------------------------------------------------------------------
// A GGUF writer (test-only)
// ------------------------------------------------------------------------------------------

struct RawTensorEntry {
    name: String,
    ne: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
    /// Written as the tensor's offset instead of the real one when set.
    offset_override: Option<u64>,
}

struct GgufBuilder {
    version: u32,
    kv: Vec<(String, GgufValue)>,
    tensors: Vec<RawTensorEntry>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array { elem_type, values } => {
            out.extend(elem_type.id().to_le_bytes());
            out.extend((values.len() as u64).to_le_bytes());
            for e in values {
                put_value(out, e);
            }
        }
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}

impl GgufBuilder {
    fn new() -> Self {
        Self {
            version: 3,
            kv: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn kv(mut self, k: &str, v: GgufValue) -> Self {
        self.kv.push((k.to_string(), v));
        self
    }

    fn tensor(mut self, name: &str, ne: &[u64], ty: GgmlType, data: Vec<u8>) -> Self {
        self.tensors.push(RawTensorEntry {
            name: name.to_string(),
            ne: ne.to_vec(),
            type_id: ty.id(),
            data,
            offset_override: None,
        });
        self
    }

    fn f32_tensor(self, name: &str, ne: &[u64], vals: &[f32]) -> Self {
        let data = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, ne, GgmlType::F32, data)
    }

    fn alignment(&self) -> u64 {
        self.kv
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .filter(|&a| a > 0)
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Header, metadata and tensor infos, without the padding and data that follow.
    fn header(&self) -> Vec<u8> {
        let align = self.alignment() as usize;
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend(v.value_type().id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(t.offset_override.unwrap_or(offset as u64).to_le_bytes());
            offset = (offset + t.data.len()).div_ceil(align) * align;
        }
        out
    }

    /// The file image; also returns the data section's offset.
    fn build(&self) -> (Vec<u8>, usize) {
        let align = self.alignment() as usize;
        let mut out = self.header();
        let mut offsets = Vec::new();
        let mut offset = 0usize;
        for t in &self.tensors {
            offsets.push(offset);
            offset = (offset + t.data.len()).div_ceil(align) * align;
        }
        let data_start = out.len().div_ceil(align) * align;
        out.resize(data_start, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend(&t.data);
        }
        (out, data_start)
    }

    fn write(&self, path: &Path) {
        std::fs::write(path, self.build().0).unwrap();
    }
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes("test.gguf", bytes)
}

fn s(v: &str) -> GgufValue {
    GgufValue::String(v.into())
}

fn arr(elem_type: GgufValueType, values: Vec<GgufValue>) -> GgufValue {
    GgufValue::Array { elem_type, values }
}

// ------------------------------------------------------------------------------------------
// Golden blocks
// ------------------------------------------------------------------------------------------

fn blocks_fixture() -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf/blocks.safetensors");
    std::fs::read(p).expect("fixtures/gguf/blocks.safetensors")
}

#[test]
fn dequantizers_match_gguf_py_bit_for_bit() {
    let bytes = blocks_fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| n.ends_with(".blocks"))
        .map(str::to_string)
        .collect();
    names.sort();
    let mut covered = std::collections::BTreeSet::new();
    for name in &names {
        let prefix = name.trim_end_matches(".blocks");
        let ty_name = prefix.split('.').next().unwrap().to_uppercase();
        let ty = (0..64)
            .filter_map(GgmlType::from_id)
            .find(|t| t.name() == ty_name)
            .unwrap_or_else(|| panic!("unknown type {ty_name}"));
        let blocks = st.tensor(name).unwrap();
        let expected = st.tensor(&format!("{prefix}.expected")).unwrap();
        assert_eq!(blocks.dtype(), Dtype::U8);
        assert_eq!(expected.dtype(), Dtype::F32);
        let want: Vec<f32> = expected
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut got = vec![0f32; want.len()];
        dequantize_blocks(ty, blocks.data(), &mut got).unwrap();
        let (block, _) = ty.block_geometry();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{prefix}: block {} element {}: got {g:e}, gguf-py {w:e}",
                i / block,
                i % block
            );
        }
        covered.insert(ty_name.clone());
        println!("{prefix}: {} blocks bit-exact", want.len() / block);
    }
    for required in ["Q8_0", "Q5_0", "Q4_K", "Q6_K", "Q5_K", "Q4_0", "BF16"] {
        assert!(covered.contains(required), "fixture lacks {required}");
    }
    // Real blocks from the embedded model were included when the fixture was made.
    for t in ["q4_k", "q6_k", "q5_0", "q8_0"] {
        assert!(names.contains(&format!("{t}.model.blocks")), "{t}");
    }
}

// ------------------------------------------------------------------------------------------
// Reader
// ------------------------------------------------------------------------------------------

fn all_value_kinds() -> Vec<(&'static str, GgufValue)> {
    vec![
        ("t.u8", GgufValue::U8(200)),
        ("t.i8", GgufValue::I8(-7)),
        ("t.u16", GgufValue::U16(65000)),
        ("t.i16", GgufValue::I16(-300)),
        ("t.u32", GgufValue::U32(4_000_000_000)),
        ("t.i32", GgufValue::I32(-5)),
        ("t.f32", GgufValue::F32(0.125)),
        ("t.bool", GgufValue::Bool(true)),
        ("t.string", s("ছবি ✓")),
        ("t.u64", GgufValue::U64(u64::MAX)),
        ("t.i64", GgufValue::I64(i64::MIN)),
        ("t.f64", GgufValue::F64(-1e300)),
        (
            "t.str_array",
            arr(GgufValueType::String, vec![s("<pad>"), s(""), s("▁the")]),
        ),
        (
            "t.f32_array",
            arr(
                GgufValueType::F32,
                vec![GgufValue::F32(-1.5), GgufValue::F32(0.0)],
            ),
        ),
        (
            "t.i32_array",
            arr(
                GgufValueType::I32,
                vec![GgufValue::I32(1), GgufValue::I32(3), GgufValue::I32(-2)],
            ),
        ),
        ("t.empty_array", arr(GgufValueType::U8, vec![])),
        (
            "t.nested",
            arr(
                GgufValueType::Array,
                vec![
                    arr(GgufValueType::Bool, vec![GgufValue::Bool(false)]),
                    arr(
                        GgufValueType::U64,
                        vec![GgufValue::U64(1), GgufValue::U64(2)],
                    ),
                ],
            ),
        ),
    ]
}

#[test]
fn reads_every_metadata_type_and_tensor_directory() {
    let mut b = GgufBuilder::new().kv("general.architecture", s("test"));
    for (k, v) in all_value_kinds() {
        b = b.kv(k, v);
    }
    let vals: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let f16_vals: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let b = b
        .f32_tensor("a", &[3, 2], &vals)
        .tensor("b", &[6], GgmlType::F16, f16_vals)
        .f32_tensor("c", &[1], &[7.0]);
    let (bytes, data_start) = b.build();
    let f = parse(bytes).unwrap();

    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset(), data_start as u64);
    assert_eq!(f.data_offset() % 32, 0);
    let keys: Vec<&str> = f.metadata().map(|(k, _)| k).collect();
    assert_eq!(keys[0], "general.architecture");
    for (k, v) in all_value_kinds() {
        assert_eq!(f.get(k), Some(&v), "{k}");
    }
    assert_eq!(f.get_str("t.string").unwrap(), Some("ছবি ✓"));
    assert_eq!(f.get_u64("t.u32").unwrap(), Some(4_000_000_000));
    assert_eq!(f.get_u64("t.u8").unwrap(), Some(200));
    assert_eq!(f.get_f64("t.f32").unwrap(), Some(0.125));
    assert_eq!(f.get_bool("t.bool").unwrap(), Some(true));
    assert_eq!(
        f.get_str_array("t.str_array").unwrap(),
        Some(vec!["<pad>", "", "▁the"])
    );
    assert_eq!(
        f.get_f32_array("t.f32_array").unwrap(),
        Some(vec![-1.5, 0.0])
    );
    assert_eq!(
        f.get_i64_array("t.i32_array").unwrap(),
        Some(vec![1, 3, -2])
    );
    assert_eq!(f.get_u64("absent").unwrap(), None);
    // A negative integer is not a u64; a string is not a number: errors name the key.
    let e = f.get_u64("t.i8").unwrap_err();
    assert!(e.to_string().contains("t.i8"), "{e}");
    let e = f.get_f64("t.string").unwrap_err();
    assert!(matches!(e, GgufError::Metadata { .. }) && e.to_string().contains("t.string"));

    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let a = f.tensor_info("a").unwrap();
    assert_eq!(a.ne, [3, 2]);
    assert_eq!(a.shape(), [2, 3]); // reversed: ne[0] is the fastest dimension
    assert_eq!((a.offset, a.n_bytes), (0, 24));
    let b_info = f.tensor_info("b").unwrap();
    assert_eq!((b_info.offset, b_info.n_bytes), (32, 12)); // aligned to 32
    assert_eq!(f.tensor_info("c").unwrap().offset, 64);
    assert_eq!(f.dequantize("a").unwrap(), vals);
    assert_eq!(f.dequantize("b").unwrap(), vals);
    assert_eq!(f.dequantize("c").unwrap(), [7.0]);
    assert_eq!(f.tensor_bytes("c").unwrap(), 7f32.to_le_bytes());
    let e = f.dequantize("nope").unwrap_err();
    assert!(matches!(e, GgufError::MissingTensor { .. }) && e.to_string().contains("nope"));
}

#[test]
fn honours_general_alignment_and_version_2() {
    let mut b = GgufBuilder::new()
        .kv("general.alignment", GgufValue::U32(256))
        .f32_tensor("x", &[5], &[1., 2., 3., 4., 5.])
        .f32_tensor("y", &[2], &[-1., -2.]);
    b.version = 2;
    let (bytes, data_start) = b.build();
    assert_eq!(data_start % 256, 0);
    let f = parse(bytes).unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.alignment(), 256);
    assert_eq!(f.data_offset(), data_start as u64);
    assert_eq!(f.tensor_info("y").unwrap().offset, 256);
    assert_eq!(f.dequantize("y").unwrap(), [-1., -2.]);
}

#[test]
fn opens_from_disk_through_mmap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    GgufBuilder::new()
        .kv("k", GgufValue::U32(1))
        .f32_tensor("w", &[2, 2], &[1., 2., 3., 4.])
        .write(&path);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.path(), path);
    assert_eq!(f.dequantize("w").unwrap(), [1., 2., 3., 4.]);
    let e = GgufFile::open(dir.path().join("absent.gguf")).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }) && e.to_string().contains("absent.gguf"));
}

#[test]
fn quantized_tensor_rows_decode_in_order() {
    // A [2, 64] Q8_0 tensor: 2 rows x 2 blocks; element (r, c) = (r * 64 + c) - 60 with d = 1.
    let mut data = Vec::new();
    for blk in 0..4 {
        data.extend(half::f16::from_f32(1.0).to_le_bytes());
        data.extend((0..32).map(|j: i32| (blk * 32 + j - 60) as i8 as u8));
    }
    let f = parse(
        GgufBuilder::new()
            .tensor("q", &[64, 2], GgmlType::Q8_0, data)
            .build()
            .0,
    )
    .unwrap();
    assert_eq!(f.tensor_info("q").unwrap().shape(), [2, 64]);
    let got = f.dequantize("q").unwrap();
    let want: Vec<f32> = (0..128).map(|i| (i - 60) as f32).collect();
    assert_eq!(got, want);
}

// ------------------------------------------------------------------------------------------
// Broken files: one clear error each, never a panic
// ------------------------------------------------------------------------------------------

fn small_file() -> Vec<u8> {
    GgufBuilder::new()
        .kv("general.architecture", s("gemma3"))
        .kv(
            "tokenizer.ggml.tokens",
            arr(GgufValueType::String, vec![s("a"), s("bc")]),
        )
        .kv("x.nested", all_value_kinds().pop().unwrap().1)
        .f32_tensor("w", &[4, 2], &[0.; 8])
        .tensor("q", &[32], GgmlType::Q8_0, vec![0; 34])
        .build()
        .0
}

#[test]
fn bad_magic() {
    let mut bytes = small_file();
    bytes[..4].copy_from_slice(b"GGML");
    let e = parse(bytes).unwrap_err();
    assert!(matches!(e, GgufError::BadMagic { .. }), "{e:?}");
    assert!(e.to_string().contains("not a GGUF file"), "{e}");
    assert!(matches!(
        parse(b"GG".to_vec()).unwrap_err(),
        GgufError::BadMagic { .. }
    ));
    assert!(matches!(
        parse(Vec::new()).unwrap_err(),
        GgufError::BadMagic { .. }
    ));
}

#[test]
fn unsupported_versions() {
    for (version, needle) in [(1u32, "v1"), (4, "version 4"), (0x0300_0000, "big-endian")] {
        let mut bytes = small_file();
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        let e = parse(bytes).unwrap_err();
        assert!(
            matches!(e, GgufError::UnsupportedVersion { version: v, .. } if v == version),
            "{e:?}"
        );
        assert!(e.to_string().contains(needle), "{e}");
    }
}

#[test]
fn every_truncation_is_an_error() {
    let full = small_file();
    for len in 0..full.len() {
        let e = match parse(full[..len].to_vec()) {
            Ok(_) => panic!("a file cut to {len} of {} bytes parsed", full.len()),
            Err(e) => e,
        };
        assert!(
            matches!(
                e,
                GgufError::BadMagic { .. }
                    | GgufError::Truncated { .. }
                    | GgufError::OutOfBounds { .. }
            ),
            "cut at {len}: {e:?}"
        );
    }
    // Cut inside the header: Truncated, with a description of what was being read.
    let e = parse(full[..40].to_vec()).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    // Cut inside the data: the tensor is named.
    let e = parse(full[..full.len() - 1].to_vec()).unwrap_err();
    match &e {
        GgufError::OutOfBounds { tensor, .. } => assert_eq!(tensor, "q"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_ggml_type_names_tensor_and_id() {
    let mut b = GgufBuilder::new().f32_tensor("ok", &[1], &[1.0]);
    b.tensors.push(RawTensorEntry {
        name: "blk.0.attn_q.weight".into(),
        ne: vec![32],
        type_id: 99,
        data: vec![0; 64],
        offset_override: None,
    });
    let e = parse(b.build().0).unwrap_err();
    match &e {
        GgufError::UnknownType {
            tensor, type_id, ..
        } => {
            assert_eq!(tensor, "blk.0.attn_q.weight");
            assert_eq!(*type_id, 99);
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("blk.0.attn_q.weight") && msg.contains("99"),
        "{msg}"
    );
}

#[test]
fn known_but_unsupported_type_fails_only_when_dequantized() {
    let f = parse(
        GgufBuilder::new()
            .tensor("iq", &[256], GgmlType::Iq2Xxs, vec![0; 66])
            .f32_tensor("ok", &[1], &[2.0])
            .build()
            .0,
    )
    .unwrap();
    assert_eq!(f.dequantize("ok").unwrap(), [2.0]);
    let e = f.dequantize("iq").unwrap_err();
    assert!(matches!(e, GgufError::UnsupportedType { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("iq") && msg.contains("IQ2_XXS") && msg.contains("16") && msg.contains("Q4_K"),
        "{msg}"
    );
}

#[test]
fn tensor_data_out_of_bounds() {
    let mut b = GgufBuilder::new().f32_tensor("w", &[8], &[0.; 8]);
    b.tensors[0].offset_override = Some(1 << 20);
    let e = parse(b.build().0).unwrap_err();
    match &e {
        GgufError::OutOfBounds {
            tensor, start, end, ..
        } => {
            assert_eq!(tensor, "w");
            assert_eq!((*start, *end), (1 << 20, (1 << 20) + 32));
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("`w`"), "{e}");
    // An offset so large that offset + size overflows.
    let mut b = GgufBuilder::new().f32_tensor("w", &[8], &[0.; 8]);
    b.tensors[0].offset_override = Some(u64::MAX - 31);
    assert!(matches!(
        parse(b.build().0).unwrap_err(),
        GgufError::OutOfBounds { .. }
    ));
}

#[test]
fn corrupt_headers() {
    let corrupt = |b: GgufBuilder, needle: &str| {
        let e = parse(b.build().0).unwrap_err();
        assert!(matches!(e, GgufError::Corrupt { .. }), "{needle}: {e:?}");
        assert!(e.to_string().contains(needle), "{needle}: {e}");
    };
    // Misaligned tensor offset.
    let mut b = GgufBuilder::new().f32_tensor("w", &[8], &[0.; 8]);
    b.tensors[0].offset_override = Some(4);
    corrupt(b, "alignment");
    // Duplicate key / tensor.
    corrupt(
        GgufBuilder::new()
            .kv("k", GgufValue::U8(1))
            .kv("k", GgufValue::U8(2)),
        "duplicate metadata key `k`",
    );
    corrupt(
        GgufBuilder::new()
            .f32_tensor("w", &[1], &[0.])
            .f32_tensor("w", &[1], &[0.]),
        "duplicate tensor name `w`",
    );
    // Rows that are not whole blocks.
    corrupt(
        GgufBuilder::new().tensor("q", &[16, 2], GgmlType::Q8_0, vec![0; 34]),
        "block size 32",
    );
    // Too many dimensions; dimensions whose product overflows.
    corrupt(
        GgufBuilder::new().f32_tensor("w", &[1, 1, 1, 1, 1], &[0.]),
        "dimensions",
    );
    corrupt(
        GgufBuilder::new().f32_tensor("w", &[u64::MAX / 2, 4], &[]),
        "overflow",
    );
    // Arrays nested beyond any sane depth.
    let mut deep = arr(GgufValueType::U8, vec![GgufValue::U8(1)]);
    for _ in 0..20 {
        deep = arr(GgufValueType::Array, vec![deep]);
    }
    corrupt(GgufBuilder::new().kv("deep", deep), "nested");

    // Byte-level corruption the builder cannot express.
    let mut bytes = GgufBuilder::new().kv("k", GgufValue::Bool(true)).header();
    let pos = bytes.len() - 1;
    bytes[pos] = 7;
    let e = parse(bytes).unwrap_err();
    assert!(e.to_string().contains("boolean"), "{e}");
    let mut bytes = GgufBuilder::new().kv("k", GgufValue::U8(0)).header();
    let type_pos = bytes.len() - 5;
    bytes[type_pos..type_pos + 4].copy_from_slice(&77u32.to_le_bytes());
    let e = parse(bytes).unwrap_err();
    assert!(e.to_string().contains("unknown value type 77"), "{e}");
    let mut bytes = GgufBuilder::new().kv("k", s("ab")).header();
    let last = bytes.len() - 1;
    bytes[last] = 0xFF;
    let e = parse(bytes).unwrap_err();
    assert!(e.to_string().contains("UTF-8"), "{e}");
    // A huge declared count must fail as truncated, not allocate.
    let mut bytes = GgufBuilder::new()
        .kv("k", arr(GgufValueType::U64, vec![]))
        .header();
    let count_pos = bytes.len() - 8;
    bytes[count_pos..].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert!(matches!(
        parse(bytes).unwrap_err(),
        GgufError::Truncated { .. }
    ));
}

#[test]
fn bad_alignment_value() {
    for v in [GgufValue::U32(0), GgufValue::U32(48), GgufValue::U64(32)] {
        let e = parse(
            GgufBuilder::new()
                .kv("general.alignment", v.clone())
                .header(),
        )
        .unwrap_err();
        assert!(matches!(e, GgufError::Metadata { .. }), "{v:?}: {e:?}");
        assert!(e.to_string().contains("general.alignment"), "{e}");
    }
}

// ------------------------------------------------------------------------------------------
// Gemma from GGUF: the tiny fixtures converted as llama.cpp does
// ------------------------------------------------------------------------------------------

/// HF name -> llama.cpp name for the tiny fixtures' tensors.
fn gguf_name(hf: &str) -> String {
    GgufGemma::gguf_name(hf).unwrap_or_else(|| panic!("no GGUF name for {hf}"))
}

/// Converts fixture `name` to GGUF the way convert_hf_to_gguf.py does: llama.cpp names,
/// reversed dims, norms as `w + 1` in F32, other tensors in their stored dtype (F16 / BF16).
/// `edit` may change the metadata and tensor list before writing.
fn convert_fixture(
    name: &str,
    edit: impl FnOnce(&mut GgufBuilder),
) -> (tempfile::TempDir, PathBuf) {
    let cfg = read_json(&fixture(name).join("config.json"));
    let st_bytes = std::fs::read(fixture(name).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let arch = if name == "gemma2" { "gemma2" } else { "gemma3" };
    let u32v = |k: &str| GgufValue::U32(cfg[k].as_u64().unwrap() as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let qpas = cfg["query_pre_attn_scalar"].as_f64().unwrap();
    let mut b = GgufBuilder::new()
        .kv("general.architecture", s(arch))
        .kv("general.name", s(&format!("tiny {name}")))
        .kv(&key("context_length"), u32v("max_position_embeddings"))
        .kv(&key("embedding_length"), u32v("hidden_size"))
        .kv(&key("block_count"), u32v("num_hidden_layers"))
        .kv(&key("feed_forward_length"), u32v("intermediate_size"))
        .kv(&key("attention.head_count"), u32v("num_attention_heads"))
        .kv(&key("attention.head_count_kv"), u32v("num_key_value_heads"))
        .kv(&key("attention.key_length"), u32v("head_dim"))
        .kv(&key("attention.value_length"), u32v("head_dim"))
        .kv(
            &key("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(1e-6),
        )
        .kv(&key("attention.sliding_window"), u32v("sliding_window"))
        // Not written by llama.cpp for Gemma (it derives the scale from head_dim); the
        // fixtures use query_pre_attn_scalar != head_dim on purpose.
        .kv(
            &key("attention.scale"),
            GgufValue::F32((1.0 / qpas.sqrt()) as f32),
        )
        .kv("tokenizer.ggml.bos_token_id", GgufValue::U32(2))
        .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(1))
        .kv("tokenizer.ggml.padding_token_id", GgufValue::U32(0));
    if name == "gemma2" {
        b = b
            .kv(&key("rope.freq_base"), GgufValue::F32(10_000.0))
            .kv(
                &key("attn_logit_softcapping"),
                GgufValue::F32(cfg["attn_logit_softcapping"].as_f64().unwrap() as f32),
            )
            .kv(
                &key("final_logit_softcapping"),
                GgufValue::F32(cfg["final_logit_softcapping"].as_f64().unwrap() as f32),
            );
    } else {
        b = b
            .kv(&key("rope.freq_base"), GgufValue::F32(1_000_000.0))
            .kv(&key("rope.scaling.type"), s("linear"))
            .kv(&key("rope.scaling.factor"), GgufValue::F32(8.0))
            .kv(
                &key("attention.sliding_window_pattern"),
                u32v("sliding_window_pattern"),
            );
    }
    let mut names: Vec<&str> = st.names();
    names.sort();
    for hf in names {
        let view = st.tensor(hf).unwrap();
        let ne: Vec<u64> = view.shape().iter().rev().map(|&d| d as u64).collect();
        let (ty, data) = if hf.ends_with("norm.weight") {
            let vals: Vec<f32> = view
                .data()
                .chunks_exact(2)
                .map(|c| {
                    let bits = u16::from_le_bytes([c[0], c[1]]);
                    match view.dtype() {
                        Dtype::F16 => half::f16::from_bits(bits).to_f32(),
                        _ => half::bf16::from_bits(bits).to_f32(),
                    }
                })
                .collect();
            let data = vals.iter().flat_map(|v| (v + 1.0).to_le_bytes()).collect();
            (GgmlType::F32, data)
        } else {
            let ty = match view.dtype() {
                Dtype::F16 => GgmlType::F16,
                Dtype::BF16 => GgmlType::BF16,
                other => panic!("{other:?}"),
            };
            (ty, view.data().to_vec())
        };
        b = b.tensor(&gguf_name(hf), &ne, ty, data);
    }
    edit(&mut b);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.gguf"));
    b.write(&path);
    (dir, path)
}

#[test]
fn gguf_config_matches_config_json() {
    for name in ["gemma2", "gemma3"] {
        let (_dir, path) = convert_fixture(name, |_| {});
        let from_gguf = GgufGemma::open(&path).unwrap().config().unwrap();
        let mut from_json = load_config(&fixture(name)).unwrap();
        // The f32 attention scale round-trips to the scalar within rounding only.
        assert!(
            (from_gguf.query_pre_attn_scalar - from_json.query_pre_attn_scalar).abs() < 1e-4,
            "{name}"
        );
        from_json.query_pre_attn_scalar = from_gguf.query_pre_attn_scalar;
        // GGUF stores epsilon as f32 (1e-6 becomes 9.99999997e-7), as llama.cpp does.
        assert!((from_gguf.rms_norm_eps - from_json.rms_norm_eps).abs() < 1e-12);
        from_json.rms_norm_eps = from_gguf.rms_norm_eps;
        // config.json holds one eos id; so does the GGUF.
        assert_eq!(from_gguf, from_json, "{name}");
    }
}

#[test]
fn gguf_logits_match_hf_reference() {
    for name in ["gemma2", "gemma3"] {
        let (_dir, path) = convert_fixture(name, |_| {});
        let m = load_gemma_gguf_dense(&path, &Device::Cpu).unwrap();
        let r = reference(name);
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let logits = m.forward(&ids, 0, None, None).unwrap();
        let d = max_abs_diff(&logits, &r["logits"]);
        println!("{name} from GGUF: max |dlogit| = {d:.3e}");
        assert!(d <= 1e-4, "{name}: {d}");
    }
}

#[test]
fn norms_stored_plus_one_are_restored() {
    let (_dir, path) = convert_fixture("gemma3", |_| {});
    let gguf = GgufGemma::open(&path).unwrap();
    let raw = gguf
        .gguf()
        .dequantize("blk.1.post_ffw_norm.weight")
        .unwrap();
    let w = weights("gemma3");
    let hf_name = "model.layers.1.post_feedforward_layernorm.weight";
    let want = w[hf_name]
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // Stored: w + 1 ...
    for (r, w) in raw.iter().zip(&want) {
        assert_eq!(*r, w + 1.0);
    }
    // ... loaded: w again (up to the f32 rounding of the round trip), for q/k norms too.
    for (hf, g) in [
        (hf_name, "blk.1.post_ffw_norm.weight"),
        (
            "model.layers.0.self_attn.k_norm.weight",
            "blk.0.attn_k_norm.weight",
        ),
        ("model.norm.weight", "output_norm.weight"),
    ] {
        let want = w[hf].to_dtype(DType::F32).unwrap();
        let n = want.dim(0).unwrap();
        let got = gguf.load_f32(hf, &[n]).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6, "{hf} ({g})");
    }
    // Linear weights are not shifted.
    let q = gguf
        .load_f32("model.layers.0.self_attn.q_proj.weight", &[64, 64])
        .unwrap();
    let want = w["model.layers.0.self_attn.q_proj.weight"]
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(max_abs_diff(&q, &want), 0.0);
}

#[test]
fn load_model_dispatches_on_path() {
    let (_dir, path) = convert_fixture("gemma2", |_| {});
    let dev = Device::Cpu;
    let r = reference("gemma2");
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let from_gguf = load_model(&path, &dev, &mut DenseBuilder::new(&dev)).unwrap();
    let from_dir = load_model(&fixture("gemma2"), &dev, &mut DenseBuilder::new(&dev)).unwrap();
    let reference_model = load_gemma(&fixture("gemma2"), &dev).unwrap();
    let a = from_gguf.forward(&ids, 0, None, None).unwrap();
    let b = from_dir.forward(&ids, 0, None, None).unwrap();
    let c = reference_model.forward(&ids, 0, None, None).unwrap();
    assert_eq!(max_abs_diff(&b, &c), 0.0);
    assert!(max_abs_diff(&a, &b) < 1e-4);

    // A GGUF without the extension is recognised by its magic.
    let renamed = path.with_extension("bin");
    std::fs::copy(&path, &renamed).unwrap();
    assert!(load_model(&renamed, &dev, &mut DenseBuilder::new(&dev)).is_ok());

    // Anything else is refused with the path named.
    let other = path.with_file_name("notes.txt");
    std::fs::write(&other, "hello").unwrap();
    let e = load_model(&other, &dev, &mut DenseBuilder::new(&dev)).unwrap_err();
    assert!(matches!(e, LoadError::NotAModel { .. }), "{e:?}");
    assert!(e.to_string().contains("notes.txt"), "{e}");
    let e = load_model(
        &path.with_file_name("absent"),
        &dev,
        &mut DenseBuilder::new(&dev),
    )
    .unwrap_err();
    assert!(matches!(e, LoadError::Io { .. }), "{e:?}");
}

fn gguf_load_err(edit: impl FnOnce(&mut GgufBuilder)) -> LoadError {
    let (_dir, path) = convert_fixture("gemma3", edit);
    load_gemma_gguf_dense(&path, &Device::Cpu).expect_err("load should fail")
}

#[test]
fn gguf_missing_tensor_names_both_names_and_file() {
    let e = gguf_load_err(|b| b.tensors.retain(|t| t.name != "blk.2.ffn_up.weight"));
    match &e {
        LoadError::MissingTensor { name, searched } => {
            assert!(name.contains("blk.2.ffn_up.weight"), "{name}");
            assert!(name.contains("model.layers.2.mlp.up_proj.weight"), "{name}");
            assert!(searched[0].ends_with("gemma3.gguf"));
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("gemma3.gguf"), "{e}");
}

#[test]
fn gguf_shape_disagreeing_with_metadata() {
    let e = gguf_load_err(|b| {
        let kv =
            b.kv.iter_mut()
                .find(|(k, _)| k == "gemma3.feed_forward_length")
                .unwrap();
        kv.1 = GgufValue::U32(96);
    });
    match &e {
        LoadError::ShapeMismatch {
            name,
            expected,
            found,
            file,
        } => {
            assert!(name.contains("blk.0.ffn_gate.weight"), "{name}");
            assert_eq!(expected, &[96, 64]);
            assert_eq!(found, &[64, 64]);
            assert!(file.ends_with("gemma3.gguf"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn gguf_unknown_architecture_and_missing_metadata() {
    let e = gguf_load_err(|b| {
        b.kv[0].1 = s("llama");
    });
    assert!(
        matches!(
            e,
            LoadError::Config {
                source: ConfigError::UnknownArchitecture { .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("llama"), "{e}");

    let e = gguf_load_err(|b| b.kv.retain(|(k, _)| k != "gemma3.block_count"));
    assert!(
        matches!(e, LoadError::Gguf(GgufError::Metadata { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("gemma3.block_count"), "{e}");

    let e = gguf_load_err(|b| {
        let kv =
            b.kv.iter_mut()
                .find(|(k, _)| k == "gemma3.attention.value_length")
                .unwrap();
        kv.1 = GgufValue::U32(8);
    });
    assert!(e.to_string().contains("value_length"), "{e}");
}

#[test]
fn gguf_unsupported_tensor_type_names_tensor() {
    let e = gguf_load_err(|b| {
        let t = b
            .tensors
            .iter_mut()
            .find(|t| t.name == "blk.1.attn_v.weight")
            .unwrap();
        // [32, 64] as one IQ4_NL block per 32 elements (18 bytes each).
        t.type_id = GgmlType::Iq4Nl.id();
        t.data = vec![0; 64 * 18];
    });
    assert!(
        matches!(e, LoadError::Gguf(GgufError::UnsupportedType { .. })),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("blk.1.attn_v.weight") && msg.contains("IQ4_NL"),
        "{msg}"
    );
}

#[test]
fn gguf_truncated_model_file() {
    let (dir, path) = convert_fixture("gemma3", |_| {});
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_gemma_gguf_dense(&cut, &Device::Cpu).unwrap_err();
    assert!(
        matches!(e, LoadError::Gguf(GgufError::OutOfBounds { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("cut.gguf"), "{e}");
    std::fs::write(&cut, &bytes[..200]).unwrap();
    let e = load_gemma_gguf_dense(&cut, &Device::Cpu).unwrap_err();
    assert!(
        matches!(e, LoadError::Gguf(GgufError::Truncated { .. })),
        "{e:?}"
    );
}

#[test]
fn dequantized_q8_0_model_loads_through_nf4_builder() {
    // Every linear stored as Q8_0 (rows of 64 = two blocks): the GGUF path dequantizes and the
    // QLoRA builder re-quantizes to NF4; logits stay close to the reference.
    let (_dir, path) = convert_fixture("gemma3", |b| {
        for t in &mut b.tensors {
            if t.name.ends_with("norm.weight") || t.name == "token_embd.weight" {
                continue;
            }
            let vals: Vec<f32> = t
                .data
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect();
            t.data = quantize_q8_0(&vals);
            t.type_id = GgmlType::Q8_0.id();
        }
    });
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(
        f.tensor_info("blk.0.ffn_down.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    let dev = Device::Cpu;
    let r = reference("gemma3");
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let dense = load_gemma_gguf_dense(&path, &dev).unwrap();
    let mut qlora = rupantor_model::QLoraBuilder::new(&dev);
    let nf4 = rupantor_model::load_gemma_gguf(&path, &dev, &mut qlora).unwrap();
    assert_eq!(qlora.adapters().len(), 3 * 7);
    let d_dense = max_abs_diff(&dense.forward(&ids, 0, None, None).unwrap(), &r["logits"]);
    let d_nf4 = max_abs_diff(&nf4.forward(&ids, 0, None, None).unwrap(), &r["logits"]);
    let scale = max_abs(&r["logits"]);
    println!("tiny gemma3 Q8_0: dense {d_dense:.3e}, NF4 {d_nf4:.3e} (max |logit| {scale:.3})");
    // Measured: dense 0.11, NF4 2.06 against max |logit| 32.8.
    assert!(d_dense > 0.0 && d_dense < 0.01 * scale, "{d_dense}");
    assert!(d_nf4 > d_dense && d_nf4 < 0.1 * scale, "{d_nf4}");
}

/// ggml's reference Q8_0 quantizer: d = absmax / 127, q = round(x / d) (ties away from zero).
fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in x.chunks_exact(32) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

#[test]
fn gguf_source_speaks_hf_names() {
    let (_dir, path) = convert_fixture("gemma3", |_| {});
    let g = GgufGemma::open(&path).unwrap();
    assert_eq!(g.arch(), "gemma3");
    assert!(g.contains("model.embed_tokens.weight"));
    assert!(g.contains("model.layers.2.self_attn.q_norm.weight"));
    assert!(!g.contains("lm_head.weight"));
    assert!(!g.contains("model.layers.3.self_attn.q_proj.weight"));
    let e = g
        .load_f32("model.layers.0.mlp.up_proj.weight", &[64, 32])
        .unwrap_err();
    assert!(matches!(e, LoadError::ShapeMismatch { .. }), "{e:?}");
    let t: Tensor = g.load_f32("model.embed_tokens.weight", &[256, 64]).unwrap();
    assert_eq!(t.dims(), [256, 64]);
}
