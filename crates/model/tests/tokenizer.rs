//! Tokenizer parity with Hugging Face.
//!
//! * The tiny Gemma-format tokenizer.json of the test models (and a variant wired the other ways
//!   the format allows) against `tokenizers` on ~400 synthetic strings:
//!   scripts/fixtures/tokenizer_tiny.py. Always runs.
//! * The real Gemma-3 vocabulary, rebuilt from the GGUF's metadata, against transformers'
//!   tokenizer for the same GGUF on every BLP-2025 instruction and trial response, the chat
//!   template forms, and synthetic edge cases: scripts/fixtures/tokenizer_ids.py. Needs the
//!   .gguf (scripts/get-model.sh) and, for the data entries, the data folder; skipped with a
//!   message when they are absent (CI has neither).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rupantor_model::tokenizer::{
    chat_prompt, chat_prompt_turns, chat_user_content, GgufVocab, Tokenizer,
};
use rupantor_model::GgufFile;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tiny tokenizer.json

#[test]
fn tiny_tokenizer_json_matches_hf_tokenizers() {
    let g3 = root().join("fixtures/gemma_tiny/gemma3/tokenizer.json");
    let g2 = root().join("fixtures/gemma_tiny/gemma2/tokenizer.json");
    assert_eq!(
        std::fs::read(&g2).unwrap(),
        std::fs::read(&g3).unwrap(),
        "both tiny models carry the same tokenizer.json"
    );
    let tok = Tokenizer::from_tokenizer_json(&g3).unwrap();
    let variant = Tokenizer::from_tokenizer_json(
        root().join("fixtures/tokenizer/tiny_variant.tokenizer.json"),
    )
    .unwrap();
    assert_eq!(tok.vocab_size(), 256);
    assert_eq!(variant.vocab_size(), 257);
    assert_eq!(
        (
            tok.bos_id(),
            tok.eos_id(),
            tok.pad_id(),
            tok.unk_id(),
            tok.eot_id()
        ),
        (Some(2), Some(1), Some(0), Some(3), Some(6))
    );
    assert!(tok.add_bos_by_default());
    assert_eq!(tok.token_to_id("<start_of_turn>"), Some(5));
    assert_eq!(tok.id_to_token(7), Some("\n"));

    let cases = jsonl(&root().join("fixtures/tokenizer/tiny_cases.jsonl"));
    assert!(cases.len() > 300, "{} cases", cases.len());
    let mut bad = Vec::new();
    for c in &cases {
        let text = s(&c["text"]);
        let got = tok.encode(text, false);
        let want = ids(&c["ids"]);
        if got != want {
            bad.push(format!("{text:?}: ids {got:?}, HF {want:?}"));
        }
        if tok.decode(&want, false) != s(&c["decoded"]) {
            bad.push(format!("{text:?}: decode {:?}", tok.decode(&want, false)));
        }
        if tok.decode(&want, true) != s(&c["decoded_skip"]) {
            bad.push(format!(
                "{text:?}: decode(skip) {:?}",
                tok.decode(&want, true)
            ));
        }
        let got = variant.encode(text, false);
        let want = ids(&c["ids_variant"]);
        if got != want {
            bad.push(format!("{text:?}: variant ids {got:?}, HF {want:?}"));
        }
        if variant.decode(&want, false) != s(&c["decoded_variant"]) {
            bad.push(format!(
                "{text:?}: variant decode {:?}",
                variant.decode(&want, false)
            ));
        }
        let with_bos = tok.encode(text, true);
        assert_eq!(with_bos[0], 2);
        assert_eq!(&with_bos[1..], &tok.encode(text, false)[..]);
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn tiny_chat_example_masks_the_response_and_closing_turn() {
    let tok =
        Tokenizer::from_tokenizer_json(root().join("fixtures/gemma_tiny/gemma2/tokenizer.json"))
            .unwrap();
    let tests = vec!["assert add(1, 2) == 3".to_string()];
    let prompt = tok.encode_chat("  Write a function to add.\n", Some(&tests));
    assert_eq!(
        prompt,
        tok.encode(
            &chat_prompt("Write a function to add.", Some(&tests)),
            false
        ),
        "the prompt text parses back to the same ids (<bos> included)"
    );
    assert_eq!(prompt[0], 2);
    let ex = tok.encode_chat_train(
        "  Write a function to add.\n",
        Some(&tests),
        "def add(a, b):\n    return a + b\n\n",
    );
    assert_eq!(&ex.ids[..ex.prompt_len], &prompt[..]);
    assert_eq!(ex.ids.len(), ex.loss_mask.len());
    let masked: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.loss_mask)
        .filter(|(_, &m)| m)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(
        tok.decode(&masked, false),
        "def add(a, b):\n    return a + b<end_of_turn>"
    );
    assert_eq!(ex.ids[ex.ids.len() - 2], 6, "<end_of_turn>");
    assert_eq!(
        ex.ids[ex.ids.len() - 1],
        7,
        "\\n after the turn, not in the loss"
    );
    assert!(!ex.loss_mask[ex.ids.len() - 1]);
    let labels = ex.labels();
    assert!(labels[..ex.prompt_len].iter().all(|&l| l == -100));
    assert_eq!(labels[ex.prompt_len], i64::from(ex.ids[ex.prompt_len]));
}

// ---------------------------------------------------------------------------------------------
// Real Gemma-3 vocabulary

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RUPANTOR_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("rupantor")
}

fn gemma3_gguf() -> Option<PathBuf> {
    let p = cache_dir().join("models/gemma-3-270m-q4_k_m.gguf");
    p.is_file().then_some(p)
}

fn data_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("RUPANTOR_DATA")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from),
        Some(root().join("../shared/data/blp25")),
        Some(root().join("data/blp25")),
    ];
    candidates.into_iter().flatten().find(|d| {
        ["trial", "dev", "test"]
            .iter()
            .all(|s| d.join(format!("{s}.jsonl")).is_file())
    })
}

/// The `tokenizer.ggml.*` metadata of a GGUF file as a [`GgufVocab`].
fn gguf_vocab(file: &GgufFile) -> GgufVocab {
    let id = |k: &str| {
        file.get_u64(&format!("tokenizer.ggml.{k}"))
            .unwrap()
            .map(|v| v as u32)
    };
    GgufVocab {
        model: file
            .get_str("tokenizer.ggml.model")
            .unwrap()
            .unwrap()
            .to_string(),
        tokens: file
            .get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap()
            .into_iter()
            .map(str::to_string)
            .collect(),
        scores: file
            .get_f32_array("tokenizer.ggml.scores")
            .unwrap()
            .unwrap_or_default(),
        types: file
            .get_i64_array("tokenizer.ggml.token_type")
            .unwrap()
            .unwrap_or_default()
            .into_iter()
            .map(|t| t as i32)
            .collect(),
        bos: id("bos_token_id"),
        eos: id("eos_token_id"),
        pad: id("padding_token_id"),
        unk: id("unknown_token_id"),
        eot: id("eot_token_id"),
        add_bos: file.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
    }
}

struct Outcome {
    compared: usize,
    identical: usize,
    skipped: usize,
    mismatches: Vec<String>,
}

/// Compares `tok` with every entry of fixtures/tokenizer/gemma3_ids.jsonl it can.
fn compare_gemma3(tok: &Tokenizer, label: &str) -> Outcome {
    let fixture = jsonl(&root().join("fixtures/tokenizer/gemma3_ids.jsonl"));
    assert_eq!(
        fixture[0]["vocab_size"].as_u64(),
        Some(tok.vocab_size() as u64)
    );
    let data = data_dir();
    if data.is_none() {
        eprintln!("{label}: BLP-2025 data not found (RUPANTOR_DATA, ../shared/data/blp25, data/blp25): only synthetic cases compared");
    }
    let mut rows: HashMap<(String, u64), Value> = HashMap::new();
    if let Some(d) = &data {
        for split in ["trial", "dev", "test"] {
            for row in jsonl(&d.join(format!("{split}.jsonl"))) {
                rows.insert((split.to_string(), row["id"].as_u64().unwrap()), row);
            }
        }
    }
    let mut out = Outcome {
        compared: 0,
        identical: 0,
        skipped: 0,
        mismatches: Vec::new(),
    };
    let mut encode_time = std::time::Duration::ZERO;
    let mut data_texts = 0;
    for e in &fixture[1..] {
        let split = s(&e["split"]);
        let field = s(&e["field"]);
        let want = ids(&e["ids"]);
        let key = format!("{split}/{}/{field}", e["id"]);
        let got = if split == "synthetic" {
            tok.encode(s(&e["text"]), false)
        } else {
            let Some(row) = rows.get(&(split.to_string(), e["id"].as_u64().unwrap())) else {
                out.skipped += 1;
                continue;
            };
            let instruction = s(&row["instruction"]);
            let tests: Vec<String> = row["test_list"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| s(t).to_string())
                .collect();
            match field {
                "instruction" | "response" => {
                    let t0 = Instant::now();
                    let ids = tok.encode(s(&row[field]), false);
                    encode_time += t0.elapsed();
                    data_texts += 1;
                    ids
                }
                "chat_prompt" => {
                    let with_tests = e["tests"].as_bool().unwrap();
                    let ids = tok.encode_chat(instruction, with_tests.then_some(&tests[..]));
                    // The text form parses back to the same ids.
                    let text = chat_prompt(instruction, with_tests.then_some(&tests[..]));
                    assert_eq!(tok.encode(&text, false), ids, "{key}: chat_prompt text");
                    ids
                }
                "chat_train" => {
                    let ex = tok.encode_chat_train(instruction, None, s(&row["response"]));
                    let masked: Vec<u32> = ex
                        .ids
                        .iter()
                        .zip(&ex.loss_mask)
                        .filter(|(_, &m)| m)
                        .map(|(&i, _)| i)
                        .collect();
                    assert_eq!(
                        tok.decode(&masked, false),
                        format!("{}<end_of_turn>", s(&row["response"]).trim()),
                        "{key}: the loss covers the response and <end_of_turn>"
                    );
                    ex.ids
                }
                other => panic!("unknown fixture field {other}"),
            }
        };
        out.compared += 1;
        if got == want {
            out.identical += 1;
        } else {
            let first = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
            let show = |v: &[u32]| {
                v[first..v.len().min(first + 6)]
                    .iter()
                    .map(|&i| format!("{i}:{:?}", tok.id_to_token(i).unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            out.mismatches.push(format!(
                "{key}: differs at token {first} of {}/{}: ours [{}] HF [{}]",
                got.len(),
                want.len(),
                show(&got),
                show(&want)
            ));
        }
        // Decoding gives the text back (byte fallback loses nothing; only a literal `▁`
        // comes back as a space).
        if split == "synthetic" {
            let text = s(&e["text"]).replace('\u{2581}', " ");
            assert_eq!(tok.decode(&want, false), text, "{key}: decode");
        } else if field == "instruction" || field == "response" {
            let row = &rows[&(split.to_string(), e["id"].as_u64().unwrap())];
            assert_eq!(tok.decode(&want, false), s(&row[field]), "{key}: decode");
        }
    }
    if data_texts > 0 {
        eprintln!(
            "{label}: encoded {data_texts} data texts in {:.1} ms (this build's opt-level)",
            encode_time.as_secs_f64() * 1e3
        );
    }
    out
}

fn report(label: &str, o: &Outcome) {
    eprintln!(
        "{label}: {} of {} compared token sequences identical to HF ({} entries skipped: no data)",
        o.identical, o.compared, o.skipped
    );
    assert!(
        o.mismatches.is_empty(),
        "{label}: {} mismatches:\n{}",
        o.mismatches.len(),
        o.mismatches.join("\n")
    );
}

#[test]
fn gemma3_gguf_tokenizer_matches_transformers() {
    let Some(path) = gemma3_gguf() else {
        eprintln!(
            "skipped: {} not found (run scripts/get-model.sh)",
            cache_dir()
                .join("models/gemma-3-270m-q4_k_m.gguf")
                .display()
        );
        return;
    };
    let t0 = Instant::now();
    let file = GgufFile::open(&path).unwrap();
    let vocab = gguf_vocab(&file);
    let t1 = Instant::now();
    let tok = Tokenizer::from_gguf_vocab(vocab).unwrap();
    eprintln!(
        "GGUF metadata read in {:.0} ms, tokenizer built in {:.0} ms",
        (t1 - t0).as_secs_f64() * 1e3,
        t1.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(tok.vocab_size(), 262_144);
    assert_eq!(
        (
            tok.bos_id(),
            tok.eos_id(),
            tok.pad_id(),
            tok.unk_id(),
            tok.eot_id()
        ),
        (Some(2), Some(1), Some(0), Some(3), Some(106))
    );
    assert_eq!(tok.token_to_id("<start_of_turn>"), Some(105));
    assert_eq!(tok.id_to_token(138), Some("\u{2581}\u{2581}"));
    assert!(tok.is_special(106) && !tok.is_special(107));
    let mut ids = vec![2, 105];
    ids.extend(tok.encode("Hello", false));
    ids.extend([106, 107]);
    assert_eq!(tok.decode(&ids, true), "Hello\n");
    assert_eq!(
        tok.decode(&ids, false),
        "<bos><start_of_turn>Hello<end_of_turn>\n"
    );
    let o = compare_gemma3(&tok, "GGUF");
    report("GGUF", &o);

    // The same tokenizer as transformers serialises it (written next to the .gguf by
    // scripts/fixtures/tokenizer_ids.py), through the tokenizer.json path.
    let json = path.with_file_name("gemma-3-270m-q4_k_m.tokenizer.json");
    if json.is_file() {
        let t0 = Instant::now();
        let tok = Tokenizer::from_tokenizer_json(&json).unwrap();
        eprintln!(
            "tokenizer.json loaded in {:.0} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
        let o = compare_gemma3(&tok, "tokenizer.json");
        report("tokenizer.json", &o);
    } else {
        eprintln!(
            "{} not found: tokenizer.json path not compared",
            json.display()
        );
    }
}

#[test]
fn chat_user_content_format() {
    let tests = vec![
        "assert f(1) == 2".to_string(),
        "assert f(2) == 3 ".to_string(),
    ];
    assert_eq!(
        chat_user_content(" Do it.\n", Some(&tests)),
        "Do it.\n\nYour code should pass these tests:\nassert f(1) == 2\nassert f(2) == 3 "
    );
    assert_eq!(chat_user_content(" Do it.\n", Some(&[])), " Do it.\n");
    assert_eq!(
        chat_prompt(" Do it.\n", Some(&tests)),
        "<bos><start_of_turn>user\nDo it.\n\nYour code should pass these tests:\nassert f(1) == 2\n\
         assert f(2) == 3<end_of_turn>\n<start_of_turn>model\n"
    );
}

#[test]
fn chat_turns_follow_gemmas_template() {
    // Rendered by jinja2 with Gemma 2's chat template (Gemma 3's renders user/assistant turns
    // the same way): messages user "  Q1 যোগফল\n", assistant "def f():\n    return 1\n\n",
    // user "Q2\n\n...assert f() == 1\n", add_generation_prompt=True.
    let want = "<bos><start_of_turn>user\nQ1 যোগফল<end_of_turn>\n<start_of_turn>model\n\
                def f():\n    return 1<end_of_turn>\n<start_of_turn>user\nQ2\n\n\
                Your code should pass these tests:\nassert f() == 1<end_of_turn>\n\
                <start_of_turn>model\n";
    let history = [("  Q1 যোগফল\n", "def f():\n    return 1\n\n")];
    let user = "Q2\n\nYour code should pass these tests:\nassert f() == 1\n";
    assert_eq!(chat_prompt_turns(&history, user), want);

    let tok =
        Tokenizer::from_tokenizer_json(root().join("fixtures/gemma_tiny/gemma2/tokenizer.json"))
            .unwrap();
    assert_eq!(
        tok.encode_chat_turns(&history, user),
        tok.encode(want, false)
    );

    // No history: byte-identical to the single-turn prompt, text and ids.
    let tests = ["assert add(1, 2) == 3".to_string()];
    for visible in [None, Some(&tests[..])] {
        let content = chat_user_content("  যোগফল বের করুন।\n", visible);
        assert_eq!(
            chat_prompt_turns::<&str>(&[], &content),
            chat_prompt("  যোগফল বের করুন।\n", visible)
        );
        assert_eq!(
            tok.encode_chat_turns::<&str>(&[], &content),
            tok.encode_chat("  যোগফল বের করুন।\n", visible)
        );
    }
}
