//! Gemma's tokenizer: SentencePiece-style BPE with byte fallback, our own implementation.
//!
//! Two ways in, one tokenizer:
//!
//! * [`Tokenizer::from_tokenizer_json`]: a Hugging Face `tokenizer.json` of the shape Gemma's
//!   use (model `BPE` with `merges`, `byte_fallback`, `fuse_unk`; normalizer `Replace(" ", "▁")`;
//!   pre-tokenizer `Split(" ", MergedWithPrevious)`, which is a no-op once spaces are gone;
//!   decoder `Replace("▁", " ") + ByteFallback + Fuse`; `added_tokens` with `special` flags).
//!   Anything outside that family (a regex normalizer, a byte-level pre-tokenizer, added tokens
//!   with `lstrip`/`rstrip`/`single_word`, a Unigram model, ...) is refused with an error that
//!   names it, rather than tokenized differently from Hugging Face.
//! * [`Tokenizer::from_gguf_vocab`]: the `tokenizer.ggml.*` arrays of a GGUF file
//!   ([`GgufVocab`]), rebuilt the way transformers rebuilds Gemma's tokenizer from a GGUF, so the
//!   ids agree with `AutoTokenizer.from_pretrained(dir, gguf_file=...)`:
//!   - whitespace-only tokens stored with real spaces (`"  "`, ids 138..167 in Gemma-3) are
//!     respelled with `▁`, the way the BPE sees a space;
//!   - the file has no merges, so every split `l + r` of a token `t` with `l`, `r` both in the
//!     vocabulary is a merge, ranked by `t`'s position in the file and then by the longer left
//!     part first. Gemma's scores are not the merge order: normal tokens carry `-(index - 494)`
//!     (the same order), but control, user-defined and byte entries a flat `-1000`, which
//!     would put the whitespace-run merges (`▁▁`, ...) behind a thousand ordinary ones;
//!   - control tokens (type 3: `<bos>`, `<start_of_turn>`, `<unused0>`, ...) are special
//!     added tokens, user-defined ones (type 4: `\n`, `\n\n`, `\t`, `<table>`, `[multimodal]`,
//!     ...) plain added tokens; both are matched whole in the raw text before BPE (longest
//!     match at the leftmost position). The whitespace runs of type 4 are *not* matched
//!     whole: their stored spelling (real spaces) is not in the respelled vocabulary, so they
//!     arise from merges, as in transformers.
//!
//! Encoding: split the raw text on added tokens; normalize each remaining piece (spaces become
//! `▁`); BPE each piece as one word: start from its characters (a character missing from the
//! vocabulary becomes its UTF-8 bytes `<0xNN>`, or `<unk>` (consecutive ones fused) when a
//! byte token is missing too), then repeatedly apply the lowest-ranked merge among adjacent
//! pairs, leftmost first, with a priority queue over a linked list of symbols (O(n log n) per
//! word; Gemma has no pre-tokenizer, so a whole line of text is one word).
//!
//! Decoding: `▁` becomes a space, runs of byte tokens are reassembled into UTF-8 (each byte of an
//! invalid run becomes U+FFFD, as Hugging Face does), special tokens are optionally skipped.
//!
//! The chat format of design §2 lives here too: [`chat_prompt`], [`Tokenizer::encode_chat`] and
//! [`Tokenizer::encode_chat_train`] (ids plus the loss mask over the response), and
//! [`chat_prompt_turns`] / [`Tokenizer::encode_chat_turns`] for prompts with earlier turns
//! (few-shot examples).

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::loss::IGNORE_INDEX;

/// The turn markers of Gemma's chat format.
pub const START_OF_TURN: &str = "<start_of_turn>";
pub const END_OF_TURN: &str = "<end_of_turn>";
/// The line that introduces the visible asserts in a user turn ([`chat_user_content`]).
pub const TESTS_HEADER: &str = "Your code should pass these tests:";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The file is well-formed but describes something this tokenizer does not implement.
    #[error("{origin}: unsupported {what} (rupantor implements Gemma's SentencePiece-style BPE)")]
    Unsupported { origin: String, what: String },
    #[error("{origin}: {problem}")]
    Invalid { origin: String, problem: String },
}

/// What a vocabulary entry is, in llama.cpp's terms (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    /// llama.cpp's `llama_token_type` numbering (0, "undefined", counts as normal).
    pub fn from_gguf(t: i32) -> Option<Self> {
        Some(match t {
            0 | 1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

/// The tokenizer half of a GGUF file's metadata, as plain data (no GGUF parsing here).
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`; only `"llama"` (SentencePiece) is accepted.
    pub model: String,
    /// `tokenizer.ggml.tokens`, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores` (may be empty). Checked for length only: see the module docs for
    /// why Gemma's merge order is the file order.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.token_type` (may be empty: then only bos/eos/unk/pad are specials).
    pub types: Vec<i32>,
    /// `tokenizer.ggml.{bos,eos,padding,unknown,eot}_token_id`.
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    /// `<end_of_turn>`; looked up by name when absent.
    pub eot: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (default true, as llama.cpp and transformers assume).
    pub add_bos: Option<bool>,
}

/// A tokenized training example in the chat format, see [`Tokenizer::encode_chat_train`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatExample {
    /// `<bos>`, the user turn, the model turn's header, the response, `<end_of_turn>`, `\n`.
    pub ids: Vec<u32>,
    /// True on the response tokens and the closing `<end_of_turn>`, the positions whose
    /// prediction is trained.
    pub loss_mask: Vec<bool>,
    /// Number of leading prompt ids (`ids[..prompt_len]` is [`Tokenizer::encode_chat`]'s output).
    pub prompt_len: usize,
}

impl ChatExample {
    /// HF-convention labels for [`crate::chunked_lm_loss`]: the id where the mask is set,
    /// [`IGNORE_INDEX`] elsewhere (the shift by one happens in the loss).
    pub fn labels(&self) -> Vec<i64> {
        self.ids
            .iter()
            .zip(&self.loss_mask)
            .map(|(&id, &m)| if m { i64::from(id) } else { IGNORE_INDEX })
            .collect()
    }
}

/// Gemma tokenizer; see the module docs.
#[derive(Clone)]
pub struct Tokenizer {
    /// id -> token text (model vocabulary and added tokens; `""` for ids that name nothing).
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    /// Added tokens flagged special: dropped by `decode(.., skip_special = true)`.
    special: Vec<bool>,
    /// The BPE model's vocabulary.
    vocab: FxMap<String, u32>,
    /// Added tokens by content (checked before `vocab` in [`Self::token_to_id`]).
    added: FxMap<String, u32>,
    /// `(left, right)` -> `(rank, merged id)`.
    merges: FxMap<u64, (u32, u32)>,
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    normalizer: Vec<Normalize>,
    pre_tokenizer: Vec<SplitRule>,
    decoder: Vec<DecodeStep>,
    /// Added tokens matched in the raw text, and those matched after normalization.
    raw_added: AddedMatcher,
    normalized_added: AddedMatcher,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    eot: Option<u32>,
    add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("merges", &self.merges.len())
            .field("added", &self.added.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Reads a Hugging Face `tokenizer.json`.
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_tokenizer_json_value(&value, &path.display().to_string())
    }

    /// [`Self::from_tokenizer_json`] on the file's text (`origin` is only used in messages).
    pub fn from_tokenizer_json_str(json: &str, origin: &str) -> Result<Self, TokenizerError> {
        let value: Value = serde_json::from_str(json).map_err(|source| TokenizerError::Json {
            path: PathBuf::from(origin),
            source,
        })?;
        Self::from_tokenizer_json_value(&value, origin)
    }

    fn from_tokenizer_json_value(root: &Value, origin: &str) -> Result<Self, TokenizerError> {
        let invalid = |problem: String| TokenizerError::Invalid {
            origin: origin.to_string(),
            problem,
        };
        let unsupported = |what: String| TokenizerError::Unsupported {
            origin: origin.to_string(),
            what,
        };
        let model = root
            .get("model")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid("no \"model\" object".into()))?;
        match model.get("type").and_then(Value::as_str) {
            Some("BPE") => {}
            None if model.contains_key("merges") => {}
            Some(other) => return Err(unsupported(format!("model type {other:?}"))),
            None => return Err(invalid("model has no \"type\"".into())),
        }
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            match model.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) if s.is_empty() => {}
                Some(v) => return Err(unsupported(format!("BPE {key} {v}"))),
            }
        }
        match model.get("dropout") {
            None | Some(Value::Null) => {}
            Some(v) if v.as_f64() == Some(0.0) => {}
            Some(v) => return Err(unsupported(format!("BPE dropout {v} (training-time only)"))),
        }
        let flag = |key: &str| model.get(key).and_then(Value::as_bool).unwrap_or(false);
        let (fuse_unk, byte_fallback, ignore_merges) = (
            flag("fuse_unk"),
            flag("byte_fallback"),
            flag("ignore_merges"),
        );

        // Vocabulary.
        let vocab_obj = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid("model.vocab is not an object".into()))?;
        let mut vocab: FxMap<String, u32> = FxMap::default();
        vocab.reserve(vocab_obj.len());
        let mut max_id = 0u32;
        for (tok, id) in vocab_obj {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| invalid(format!("model.vocab[{tok:?}] is not a token id")))?;
            max_id = max_id.max(id);
            vocab.insert(tok.clone(), id);
        }

        // Added tokens.
        struct Added {
            id: u32,
            content: String,
            special: bool,
            normalized: bool,
        }
        let mut added_list = Vec::new();
        for (i, t) in root
            .get("added_tokens")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let id = t
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| invalid(format!("added_tokens[{i}] has no valid id")))?;
            let content = t
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("added_tokens[{i}] has no content")))?;
            for opt in ["lstrip", "rstrip", "single_word"] {
                if t.get(opt).and_then(Value::as_bool) == Some(true) {
                    return Err(unsupported(format!("added token {content:?} with {opt}")));
                }
            }
            let b = |k: &str| t.get(k).and_then(Value::as_bool).unwrap_or(false);
            max_id = max_id.max(id);
            added_list.push(Added {
                id,
                content: content.to_string(),
                special: b("special"),
                normalized: b("normalized"),
            });
        }

        let n = max_id as usize + 1;
        let mut tokens = vec![String::new(); n];
        for (tok, &id) in &vocab {
            tokens[id as usize] = tok.clone();
        }
        for a in &added_list {
            tokens[a.id as usize] = a.content.clone();
        }

        // Merges.
        let merges_json = model
            .get("merges")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut merges: FxMap<u64, (u32, u32)> = FxMap::default();
        merges.reserve(merges_json.len());
        for (rank, m) in merges_json.iter().enumerate() {
            let (a, b): (&str, &str) = match m {
                Value::String(s) => s
                    .split_once(' ')
                    .ok_or_else(|| invalid(format!("merge {rank} {s:?} is not \"a b\"")))?,
                Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                    (Some(a), Some(b)) => (a, b),
                    _ => return Err(invalid(format!("merge {rank} is not two strings"))),
                },
                _ => {
                    return Err(invalid(format!(
                        "merge {rank} is neither \"a b\" nor [a, b]"
                    )))
                }
            };
            let id = |s: &str| {
                vocab.get(s).copied().ok_or_else(|| {
                    invalid(format!(
                        "merge {rank} ({a:?}, {b:?}): {s:?} is not in the vocabulary"
                    ))
                })
            };
            let (ia, ib) = (id(a)?, id(b)?);
            let new_id = id(&format!("{a}{b}"))?;
            // Later duplicates win, as when Hugging Face collects its merge map.
            merges.insert(pair_key(ia, ib), (rank as u32, new_id));
        }

        let unk = match model.get("unk_token") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(
                *vocab
                    .get(s.as_str())
                    .ok_or_else(|| invalid(format!("unk_token {s:?} is not in the vocabulary")))?,
            ),
            Some(v) => return Err(invalid(format!("unk_token {v} is not a string"))),
        };

        let normalizer = parse_normalizer(root.get("normalizer"), origin)?;
        let pre_tokenizer = parse_pre_tokenizer(root.get("pre_tokenizer"), origin)?;
        let decoder = parse_decoder(root.get("decoder"), origin)?;

        let mut kinds = vec![TokenKind::Normal; n];
        let mut special = vec![false; n];
        for (id, tok) in tokens.iter().enumerate() {
            if parse_byte_token(tok).is_some() {
                kinds[id] = TokenKind::Byte;
            }
        }
        if let Some(u) = unk {
            kinds[u as usize] = TokenKind::Unknown;
        }
        let mut added = FxMap::default();
        let mut raw = Vec::new();
        let mut normalized = Vec::new();
        for a in &added_list {
            kinds[a.id as usize] = if a.special {
                TokenKind::Control
            } else {
                TokenKind::UserDefined
            };
            special[a.id as usize] = a.special;
            added.insert(a.content.clone(), a.id);
            if a.content.is_empty() {
                continue;
            }
            if a.normalized {
                // Hugging Face matches these in the normalized text, spelled as normalized,
                // and decodes them from that spelling too.
                let spelled = normalize(&normalizer, &a.content).into_owned();
                tokens[a.id as usize] = spelled.clone();
                normalized.push((spelled, a.id));
            } else {
                raw.push((a.content.clone(), a.id));
            }
        }

        let find = |name: &str| added.get(name).or_else(|| vocab.get(name)).copied();
        let template_bos = post_processor_first_special(root.get("post_processor"));
        let bos = find("<bos>").or_else(|| template_bos.as_deref().and_then(find));
        let add_bos = template_bos.is_some();
        let (eos, pad, eot) = (find("<eos>"), find("<pad>"), find(END_OF_TURN));
        let byte_ids = byte_table(&vocab);
        Ok(Self {
            tokens,
            kinds,
            special,
            vocab,
            added,
            merges,
            byte_ids,
            unk,
            fuse_unk,
            byte_fallback,
            ignore_merges,
            normalizer,
            pre_tokenizer,
            decoder,
            raw_added: AddedMatcher::new(&raw),
            normalized_added: AddedMatcher::new(&normalized),
            bos,
            eos,
            pad,
            eot,
            add_bos,
        })
    }

    /// Rebuilds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata (see the module
    /// docs for the rules, which follow transformers' GGUF loader for Gemma).
    pub fn from_gguf_vocab(v: GgufVocab) -> Result<Self, TokenizerError> {
        let origin = "GGUF tokenizer";
        let invalid = |problem: String| TokenizerError::Invalid {
            origin: origin.to_string(),
            problem,
        };
        if v.model != "llama" {
            return Err(TokenizerError::Unsupported {
                origin: origin.into(),
                what: format!(
                    "tokenizer.ggml.model {:?} (expected \"llama\", SentencePiece)",
                    v.model
                ),
            });
        }
        let n = v.tokens.len();
        if n == 0 || n > u32::MAX as usize {
            return Err(invalid(format!("tokenizer.ggml.tokens has {n} entries")));
        }
        for (name, len) in [("scores", v.scores.len()), ("token_type", v.types.len())] {
            if len != 0 && len != n {
                return Err(invalid(format!(
                    "tokenizer.ggml.{name} has {len} entries but tokenizer.ggml.tokens has {n}"
                )));
            }
        }
        let mut kinds = Vec::with_capacity(n);
        for (i, &t) in v.types.iter().enumerate() {
            kinds.push(TokenKind::from_gguf(t).ok_or_else(|| {
                invalid(format!(
                    "token {i} ({:?}) has unknown type {t}",
                    v.tokens[i]
                ))
            })?);
        }
        kinds.resize(n, TokenKind::Normal);
        for (name, id) in [
            ("bos", v.bos),
            ("eos", v.eos),
            ("padding", v.pad),
            ("unknown", v.unk),
            ("eot", v.eot),
        ] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return Err(invalid(format!(
                    "tokenizer.ggml.{name}_token_id {id} is outside the vocabulary of {n}"
                )));
            }
        }

        // Whitespace-only tokens written with real spaces are the BPE's `▁` runs.
        let tokens: Vec<String> = v
            .tokens
            .iter()
            .map(|t| {
                if t.contains(' ') && t.chars().all(python_isspace) {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect();
        // Later duplicates win, as in a Python dict.
        let mut vocab: FxMap<String, u32> = FxMap::default();
        vocab.reserve(n);
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), i as u32);
        }

        // Merges: every split of every token into two vocabulary entries, ranked by the
        // token's position, then longer left part first.
        let mut merges: FxMap<u64, (u32, u32)> = FxMap::default();
        merges.reserve(n * 2);
        let mut rank = 0u32;
        let mut splits: Vec<(usize, u32, u32)> = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            if vocab.get(t.as_str()) != Some(&(i as u32)) {
                continue;
            }
            splits.clear();
            for (nl, (b, _)) in t.char_indices().enumerate().skip(1) {
                let Some(&l) = vocab.get(&t[..b]) else {
                    continue;
                };
                if let Some(&r) = vocab.get(&t[b..]) {
                    splits.push((nl, l, r));
                }
            }
            splits.sort_by_key(|&(nl, _, _)| Reverse(nl));
            for &(_, l, r) in &splits {
                merges.insert(pair_key(l, r), (rank, i as u32));
                rank += 1;
            }
        }

        // Added tokens, as transformers' GGUF loader adds them.
        let mut special = vec![false; n];
        let mut added: FxMap<String, u32> = FxMap::default();
        let mut raw = Vec::new();
        let mut add = |id: u32, is_special: bool, added: &mut FxMap<String, u32>| {
            let content = tokens[id as usize].clone();
            special[id as usize] |= is_special;
            if !content.is_empty() && added.insert(content.clone(), id).is_none() {
                raw.push((content, id));
            }
        };
        for (i, kind) in kinds.iter().enumerate() {
            if *kind == TokenKind::Control {
                add(i as u32, true, &mut added);
            }
        }
        // GemmaTokenizer's own special tokens (all control tokens in Gemma's files anyway).
        let mask = vocab.get("<mask>").copied();
        for id in [v.bos, v.eos, v.unk, v.pad, mask].into_iter().flatten() {
            add(id, true, &mut added);
        }
        for (i, kind) in kinds.iter().enumerate() {
            // Only if the file's own spelling is in the (respelled) vocabulary.
            if *kind == TokenKind::UserDefined && vocab.contains_key(v.tokens[i].as_str()) {
                add(i as u32, false, &mut added);
            }
        }

        let unk = v.unk.or_else(|| vocab.get("<unk>").copied());
        let eot = v.eot.or_else(|| vocab.get(END_OF_TURN).copied());
        let byte_ids = byte_table(&vocab);
        Ok(Self {
            tokens,
            kinds,
            special,
            vocab,
            added,
            merges,
            byte_ids,
            unk,
            fuse_unk: true,
            byte_fallback: true,
            ignore_merges: false,
            normalizer: vec![Normalize::Replace {
                pattern: " ".into(),
                content: "\u{2581}".into(),
            }],
            pre_tokenizer: Vec::new(),
            decoder: vec![
                DecodeStep::Replace {
                    pattern: "\u{2581}".into(),
                    content: " ".into(),
                },
                DecodeStep::ByteFallback,
                DecodeStep::Fuse,
            ],
            raw_added: AddedMatcher::new(&raw),
            normalized_added: AddedMatcher::new(&[]),
            bos: v.bos,
            eos: v.eos,
            pad: v.pad,
            eot,
            add_bos: v.add_bos.unwrap_or(true),
        })
    }

    /// Token ids of `text`; with `add_bos`, `<bos>` first. Added tokens written in the text
    /// (`<start_of_turn>`, `\n`, ...) become their ids, as Hugging Face does.
    pub fn encode(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            out.extend(self.bos);
        }
        self.encode_into(text, &mut out);
        out
    }

    /// Appends the ids of `text` (no `<bos>`) to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        let mut scratch = BpeScratch::default();
        let mut raw_pieces = Vec::new();
        self.raw_added.split(text, &mut raw_pieces);
        for piece in raw_pieces {
            let text = match piece {
                Piece::Token(id) => {
                    out.push(id);
                    continue;
                }
                Piece::Text(t) => t,
            };
            let normalized = normalize(&self.normalizer, text);
            let mut norm_pieces = Vec::new();
            self.normalized_added.split(&normalized, &mut norm_pieces);
            for p in &norm_pieces {
                match *p {
                    Piece::Token(id) => out.push(id),
                    Piece::Text(t) => {
                        let mut words = vec![t];
                        for rule in &self.pre_tokenizer {
                            words = words.iter().flat_map(|w| rule.apply(w)).collect();
                        }
                        for w in &words {
                            self.bpe(w, out, &mut scratch);
                        }
                    }
                }
            }
        }
    }

    /// Text of `ids`. With `skip_special`, special tokens (`<bos>`, `<end_of_turn>`, ...) are
    /// left out; plain added tokens such as `\n` never are. Unknown ids are skipped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut parts: Vec<Cow<'_, str>> = ids
            .iter()
            .filter_map(|&id| {
                let i = id as usize;
                if i >= self.tokens.len() || (skip_special && self.special[i]) {
                    return None;
                }
                Some(Cow::Borrowed(self.tokens[i].as_str()))
            })
            .collect();
        for step in &self.decoder {
            parts = step.apply(parts);
        }
        parts.concat()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.added
            .get(token)
            .or_else(|| self.vocab.get(token))
            .copied()
    }

    /// The token's text as the vocabulary spells it (`▁` for spaces, `<0xNN>` for bytes).
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens
            .get(id as usize)
            .map(String::as_str)
            .filter(|t| !t.is_empty())
    }

    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// Whether `id` is a special token (dropped by `decode(.., true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// One past the largest id.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// `<end_of_turn>`, where a chat model's turn stops.
    pub fn eot_id(&self) -> Option<u32> {
        self.eot
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }

    /// Whether the source asks for `<bos>` in front of every sequence (GGUF
    /// `add_bos_token`; a `tokenizer.json` post-processor that starts with a special token).
    pub fn add_bos_by_default(&self) -> bool {
        self.add_bos
    }

    /// The generation prompt of design §2 as ids: `<bos>` then the user turn holding the
    /// instruction (and the visible asserts, when given) and the model turn's header.
    /// The same ids as `apply_chat_template(.., add_generation_prompt=True)` with Gemma's
    /// template (fixture-tested).
    pub fn encode_chat(&self, instruction: &str, visible_tests: Option<&[String]>) -> Vec<u32> {
        self.encode_chat_turns::<&str>(&[], &chat_user_content(instruction, visible_tests))
    }

    /// A generation prompt of several turns as ids: [`chat_prompt_turns`] (earlier
    /// `(user, model)` exchanges, then the `user` turn and the model turn's header), with
    /// `<bos>` as its id. With no history this is [`Self::encode_chat`] of the same content.
    pub fn encode_chat_turns<S: AsRef<str>>(&self, history: &[(S, S)], user: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        ids.extend(self.bos);
        let prompt = chat_prompt_turns(history, user);
        self.encode_into(&prompt[BOS_TEXT.len()..], &mut ids);
        ids
    }

    /// A training example: [`Self::encode_chat`]'s prompt, then the response (trimmed, as
    /// Gemma's template does), `<end_of_turn>` and `\n`. The loss mask covers the response
    /// tokens and the closing `<end_of_turn>`.
    ///
    /// The response is encoded on its own and appended to the prompt's ids, so the prompt the
    /// model is trained on is exactly the one it is given at generation time. For Gemma's
    /// vocabularies this is also what tokenizing the whole conversation at once gives, since
    /// `\n` and the turn markers are added tokens that split the text before BPE
    /// (fixture-tested against `apply_chat_template` with the model turn).
    pub fn encode_chat_train(
        &self,
        instruction: &str,
        visible_tests: Option<&[String]>,
        response: &str,
    ) -> ChatExample {
        let mut ids = self.encode_chat(instruction, visible_tests);
        let prompt_len = ids.len();
        self.encode_into(python_trim(response), &mut ids);
        match self.eot {
            Some(eot) => ids.push(eot),
            None => self.encode_into(END_OF_TURN, &mut ids),
        }
        let masked_end = ids.len();
        self.encode_into("\n", &mut ids);
        let loss_mask = (0..ids.len())
            .map(|i| i >= prompt_len && i < masked_end)
            .collect();
        ChatExample {
            ids,
            loss_mask,
            prompt_len,
        }
    }

    /// SentencePiece-style BPE of one pre-tokenized word, appended to `out`; follows
    /// Hugging Face's `BPE::merge_word` (byte fallback, unk fusion) and `Word::merge_all`.
    fn bpe(&self, word: &str, out: &mut Vec<u32>, s: &mut BpeScratch) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges {
            if let Some(&id) = self.vocab.get(word) {
                out.push(id);
                return;
            }
        }
        let ids = &mut s.ids;
        ids.clear();
        let mut pending_unk: Option<u32> = None;
        for (i, ch) in word.char_indices() {
            let piece = &word[i..i + ch.len_utf8()];
            if let Some(&id) = self.vocab.get(piece) {
                if let Some(u) = pending_unk.take() {
                    ids.push(u);
                }
                ids.push(id);
                continue;
            }
            if self.byte_fallback && piece.bytes().all(|b| self.byte_ids[b as usize].is_some()) {
                // Hugging Face leaves a pending unk pending here.
                ids.extend(piece.bytes().filter_map(|b| self.byte_ids[b as usize]));
                continue;
            }
            if let Some(unk) = self.unk {
                pending_unk = match pending_unk {
                    Some(u) if self.fuse_unk => Some(u),
                    Some(u) => {
                        ids.push(u);
                        Some(unk)
                    }
                    None => Some(unk),
                };
            }
            // No unk token: the character is dropped, as in Hugging Face.
        }
        if let Some(u) = pending_unk {
            ids.push(u);
        }
        let n = ids.len();
        if n < 2 {
            out.extend_from_slice(ids);
            return;
        }

        const NONE: u32 = u32::MAX;
        let (prev, next, alive, heap) = (&mut s.prev, &mut s.next, &mut s.alive, &mut s.heap);
        prev.clear();
        next.clear();
        alive.clear();
        heap.clear();
        prev.extend((0..n as u32).map(|i| i.wrapping_sub(1)));
        next.extend((1..=n as u32).map(|i| if i as usize == n { NONE } else { i }));
        alive.resize(n, true);
        for i in 0..n - 1 {
            if let Some(&(rank, new_id)) = self.merges.get(&pair_key(ids[i], ids[i + 1])) {
                heap.push(Reverse((rank, i as u32, new_id)));
            }
        }
        while let Some(Reverse((_, pos, new_id))) = heap.pop() {
            let p = pos as usize;
            if !alive[p] || next[p] == NONE {
                continue;
            }
            let r = next[p] as usize;
            // A stale entry: the pair at `p` changed since it was queued.
            match self.merges.get(&pair_key(ids[p], ids[r])) {
                Some(&(_, id)) if id == new_id => {}
                _ => continue,
            }
            ids[p] = new_id;
            alive[r] = false;
            let rn = next[r];
            next[p] = rn;
            if rn != NONE {
                prev[rn as usize] = pos;
            }
            if prev[p] != NONE {
                let l = prev[p] as usize;
                if let Some(&(rank, id)) = self.merges.get(&pair_key(ids[l], ids[p])) {
                    heap.push(Reverse((rank, l as u32, id)));
                }
            }
            if rn != NONE {
                if let Some(&(rank, id)) = self.merges.get(&pair_key(ids[p], ids[rn as usize])) {
                    heap.push(Reverse((rank, pos, id)));
                }
            }
        }
        let mut i = 0u32;
        while i != NONE {
            out.push(ids[i as usize]);
            i = next[i as usize];
        }
    }
}

const BOS_TEXT: &str = "<bos>";

/// The user turn's content: the instruction, then, when `visible_tests` holds any, a blank
/// line, [`TESTS_HEADER`] and the asserts one per line.
pub fn chat_user_content(instruction: &str, visible_tests: Option<&[String]>) -> String {
    match visible_tests {
        Some(tests) if !tests.is_empty() => format!(
            "{}\n\n{TESTS_HEADER}\n{}",
            python_trim(instruction),
            tests.join("\n")
        ),
        _ => instruction.to_string(),
    }
}

/// The generation prompt of design §2 as text, exactly as Gemma's chat template renders it
/// (the content trimmed): `<bos><start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n`.
pub fn chat_prompt(instruction: &str, visible_tests: Option<&[String]>) -> String {
    chat_prompt_turns::<&str>(&[], &chat_user_content(instruction, visible_tests))
}

/// A generation prompt of several turns as text, exactly as Gemma's chat template (Gemma 2
/// and 3 alike) renders `[user, assistant, ..., user]` with `add_generation_prompt=True`:
/// `<bos>`, then per turn `<start_of_turn>{user|model}\n{content trimmed}<end_of_turn>\n`,
/// then `<start_of_turn>model\n`. `history` holds the earlier `(user, model)` exchanges
/// (few-shot examples, say), so the roles alternate and the last turn is the user's by
/// construction, as the template requires.
pub fn chat_prompt_turns<S: AsRef<str>>(history: &[(S, S)], user: &str) -> String {
    fn turn(out: &mut String, role: &str, content: &str) {
        out.push_str(START_OF_TURN);
        out.push_str(role);
        out.push('\n');
        out.push_str(python_trim(content));
        out.push_str(END_OF_TURN);
        out.push('\n');
    }
    let mut s = String::from(BOS_TEXT);
    for (u, m) in history {
        turn(&mut s, "user", u.as_ref());
        turn(&mut s, "model", m.as_ref());
    }
    turn(&mut s, "user", user);
    s.push_str(START_OF_TURN);
    s.push_str("model\n");
    s
}

/// Python's `str.isspace` (what Jinja's `trim` strips): Rust's whitespace plus the ASCII
/// information separators U+001C..U+001F.
fn python_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn python_trim(s: &str) -> &str {
    s.trim_matches(python_isspace)
}

fn pair_key(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

/// `<0xNN>` -> the byte.
fn parse_byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The ids of `<0x00>`..`<0xFF>` (uppercase hex, as Hugging Face looks them up).
fn byte_table(vocab: &FxMap<String, u32>) -> [Option<u32>; 256] {
    std::array::from_fn(|b| vocab.get(format!("<0x{b:02X}>").as_str()).copied())
}

#[derive(Default)]
struct BpeScratch {
    ids: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    alive: Vec<bool>,
    heap: BinaryHeap<Reverse<(u32, u32, u32)>>,
}

// ---------------------------------------------------------------------------------------------
// Normalizer, pre-tokenizer, decoder: the subset of Hugging Face's that Gemma uses.

#[derive(Debug, Clone)]
enum Normalize {
    Replace { pattern: String, content: String },
    Prepend(String),
}

fn normalize<'a>(steps: &[Normalize], text: &'a str) -> Cow<'a, str> {
    let mut s = Cow::Borrowed(text);
    for step in steps {
        match step {
            Normalize::Replace { pattern, content } => {
                if s.contains(pattern.as_str()) {
                    s = Cow::Owned(s.replace(pattern.as_str(), content));
                }
            }
            Normalize::Prepend(p) => {
                if !s.is_empty() {
                    s = Cow::Owned(format!("{p}{s}"));
                }
            }
        }
    }
    s
}

fn string_pattern(v: &Value, origin: &str, what: &str) -> Result<String, TokenizerError> {
    match v.get("pattern") {
        Some(p) => match p.get("String").and_then(Value::as_str) {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            _ => Err(TokenizerError::Unsupported {
                origin: origin.into(),
                what: format!("{what} pattern {p} (only non-empty string patterns)"),
            }),
        },
        None => Err(TokenizerError::Invalid {
            origin: origin.into(),
            problem: format!("{what} has no pattern"),
        }),
    }
}

fn type_of(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("?")
}

fn parse_normalizer(v: Option<&Value>, origin: &str) -> Result<Vec<Normalize>, TokenizerError> {
    let mut out = Vec::new();
    fn walk(v: &Value, origin: &str, out: &mut Vec<Normalize>) -> Result<(), TokenizerError> {
        match type_of(v) {
            "Sequence" => {
                for n in v
                    .get("normalizers")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                {
                    walk(n, origin, out)?;
                }
            }
            "Replace" => out.push(Normalize::Replace {
                pattern: string_pattern(v, origin, "Replace normalizer")?,
                content: v
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            }),
            "Prepend" => out.push(Normalize::Prepend(
                v.get("prepend")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            )),
            other => {
                return Err(TokenizerError::Unsupported {
                    origin: origin.into(),
                    what: format!("normalizer {other:?}"),
                })
            }
        }
        Ok(())
    }
    match v {
        None | Some(Value::Null) => {}
        Some(v) => walk(v, origin, &mut out)?,
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy)]
enum SplitBehavior {
    Removed,
    Isolated,
    MergedWithPrevious,
    MergedWithNext,
    Contiguous,
}

/// Hugging Face's `Split` pre-tokenizer with a string pattern.
#[derive(Debug, Clone)]
struct SplitRule {
    pattern: String,
    behavior: SplitBehavior,
}

impl SplitRule {
    fn apply<'a>(&self, s: &'a str) -> Vec<&'a str> {
        let mut matches: Vec<(usize, usize)> = s
            .match_indices(self.pattern.as_str())
            .map(|(i, m)| (i, i + m.len()))
            .collect();
        if let SplitBehavior::Contiguous = self.behavior {
            let mut fused: Vec<(usize, usize)> = Vec::with_capacity(matches.len());
            for m in matches {
                match fused.last_mut() {
                    Some(last) if last.1 == m.0 => last.1 = m.1,
                    _ => fused.push(m),
                }
            }
            matches = fused;
        }
        let mut out = Vec::new();
        let mut start = 0;
        for &(a, b) in &matches {
            match self.behavior {
                SplitBehavior::Removed => {
                    out.push(&s[start..a]);
                    start = b;
                }
                SplitBehavior::Isolated | SplitBehavior::Contiguous => {
                    out.push(&s[start..a]);
                    out.push(&s[a..b]);
                    start = b;
                }
                SplitBehavior::MergedWithPrevious => {
                    out.push(&s[start..b]);
                    start = b;
                }
                SplitBehavior::MergedWithNext => {
                    out.push(&s[start..a]);
                    start = a;
                }
            }
        }
        out.push(&s[start..]);
        out.retain(|p| !p.is_empty());
        out
    }
}

fn parse_pre_tokenizer(v: Option<&Value>, origin: &str) -> Result<Vec<SplitRule>, TokenizerError> {
    fn walk(v: &Value, origin: &str, out: &mut Vec<SplitRule>) -> Result<(), TokenizerError> {
        let unsupported = |what: String| TokenizerError::Unsupported {
            origin: origin.into(),
            what,
        };
        match type_of(v) {
            "Sequence" => {
                for p in v
                    .get("pretokenizers")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                {
                    walk(p, origin, out)?;
                }
            }
            "Split" => {
                if v.get("invert").and_then(Value::as_bool) == Some(true) {
                    return Err(unsupported("inverted Split pre-tokenizer".into()));
                }
                let behavior = match v.get("behavior").and_then(Value::as_str) {
                    Some("Removed") => SplitBehavior::Removed,
                    Some("Isolated") => SplitBehavior::Isolated,
                    Some("MergedWithPrevious") => SplitBehavior::MergedWithPrevious,
                    Some("MergedWithNext") => SplitBehavior::MergedWithNext,
                    Some("Contiguous") => SplitBehavior::Contiguous,
                    other => return Err(unsupported(format!("Split behavior {other:?}"))),
                };
                out.push(SplitRule {
                    pattern: string_pattern(v, origin, "Split pre-tokenizer")?,
                    behavior,
                });
            }
            other => return Err(unsupported(format!("pre-tokenizer {other:?}"))),
        }
        Ok(())
    }
    let mut out = Vec::new();
    match v {
        None | Some(Value::Null) => {}
        Some(v) => walk(v, origin, &mut out)?,
    }
    Ok(out)
}

#[derive(Debug, Clone)]
enum DecodeStep {
    Replace {
        pattern: String,
        content: String,
    },
    ByteFallback,
    Fuse,
    Strip {
        content: char,
        start: usize,
        stop: usize,
    },
}

impl DecodeStep {
    fn apply<'a>(&self, parts: Vec<Cow<'a, str>>) -> Vec<Cow<'a, str>> {
        match self {
            Self::Replace { pattern, content } => parts
                .into_iter()
                .map(|p| {
                    if p.contains(pattern.as_str()) {
                        Cow::Owned(p.replace(pattern.as_str(), content))
                    } else {
                        p
                    }
                })
                .collect(),
            Self::ByteFallback => {
                let mut out = Vec::with_capacity(parts.len());
                let mut bytes = Vec::new();
                let flush = |bytes: &mut Vec<u8>, out: &mut Vec<Cow<'a, str>>| {
                    if bytes.is_empty() {
                        return;
                    }
                    match String::from_utf8(std::mem::take(bytes)) {
                        Ok(s) => out.push(Cow::Owned(s)),
                        Err(e) => {
                            let n = e.as_bytes().len();
                            out.extend((0..n).map(|_| Cow::Borrowed("\u{fffd}")));
                        }
                    }
                };
                for p in parts {
                    match parse_byte_token(&p) {
                        Some(b) => bytes.push(b),
                        None => {
                            flush(&mut bytes, &mut out);
                            out.push(p);
                        }
                    }
                }
                flush(&mut bytes, &mut out);
                out
            }
            Self::Fuse => vec![Cow::Owned(parts.concat())],
            Self::Strip {
                content,
                start,
                stop,
            } => parts
                .into_iter()
                .map(|p| {
                    let mut s: &str = &p;
                    for _ in 0..*start {
                        match s.strip_prefix(*content) {
                            Some(rest) => s = rest,
                            None => break,
                        }
                    }
                    for _ in 0..*stop {
                        match s.strip_suffix(*content) {
                            Some(rest) => s = rest,
                            None => break,
                        }
                    }
                    Cow::Owned(s.to_string())
                })
                .collect(),
        }
    }
}

fn parse_decoder(v: Option<&Value>, origin: &str) -> Result<Vec<DecodeStep>, TokenizerError> {
    fn walk(v: &Value, origin: &str, out: &mut Vec<DecodeStep>) -> Result<(), TokenizerError> {
        match type_of(v) {
            "Sequence" => {
                for d in v
                    .get("decoders")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                {
                    walk(d, origin, out)?;
                }
            }
            "Replace" => out.push(DecodeStep::Replace {
                pattern: string_pattern(v, origin, "Replace decoder")?,
                content: v
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            }),
            "ByteFallback" => out.push(DecodeStep::ByteFallback),
            "Fuse" => out.push(DecodeStep::Fuse),
            "Strip" => {
                let content = v
                    .get("content")
                    .and_then(Value::as_str)
                    .and_then(|s| {
                        let mut c = s.chars();
                        c.next().filter(|_| c.next().is_none())
                    })
                    .ok_or_else(|| TokenizerError::Invalid {
                        origin: origin.into(),
                        problem: "Strip decoder content is not one character".into(),
                    })?;
                let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
                out.push(DecodeStep::Strip {
                    content,
                    start: n("start"),
                    stop: n("stop"),
                });
            }
            other => {
                return Err(TokenizerError::Unsupported {
                    origin: origin.into(),
                    what: format!("decoder {other:?}"),
                })
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    match v {
        None | Some(Value::Null) => {}
        Some(v) => walk(v, origin, &mut out)?,
    }
    Ok(out)
}

/// The first special token of a `TemplateProcessing` post-processor's `single` template
/// (`<bos>` for Gemma), when the template starts with one.
fn post_processor_first_special(v: Option<&Value>) -> Option<String> {
    let v = v?;
    let single = match type_of(v) {
        "TemplateProcessing" => v.get("single")?.as_array()?,
        "Sequence" => {
            return v
                .get("processors")?
                .as_array()?
                .iter()
                .find_map(|p| post_processor_first_special(Some(p)))
        }
        _ => return None,
    };
    let first = single.first()?.get("SpecialToken")?;
    first.get("id")?.as_str().map(str::to_string)
}

// ---------------------------------------------------------------------------------------------
// Added-token matching: leftmost-longest over a byte trie (Hugging Face uses an Aho-Corasick
// automaton with the same match semantics).

enum Piece<'a> {
    Text(&'a str),
    Token(u32),
}

struct TrieNode {
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
    id: Option<u32>,
}

#[derive(Clone)]
struct AddedMatcher {
    nodes: std::sync::Arc<Vec<TrieNode>>,
    first: [bool; 256],
}

impl AddedMatcher {
    fn new(tokens: &[(String, u32)]) -> Self {
        let mut nodes = vec![TrieNode {
            children: Vec::new(),
            id: None,
        }];
        let mut first = [false; 256];
        for (content, id) in tokens {
            let Some(&b0) = content.as_bytes().first() else {
                continue;
            };
            first[b0 as usize] = true;
            let mut node = 0usize;
            for &b in content.as_bytes() {
                node = match nodes[node].children.binary_search_by_key(&b, |&(c, _)| c) {
                    Ok(k) => nodes[node].children[k].1 as usize,
                    Err(k) => {
                        let new = nodes.len();
                        nodes[node].children.insert(k, (b, new as u32));
                        nodes.push(TrieNode {
                            children: Vec::new(),
                            id: None,
                        });
                        new
                    }
                };
            }
            nodes[node].id = Some(*id);
        }
        Self {
            nodes: std::sync::Arc::new(nodes),
            first,
        }
    }

    /// The longest added token starting at byte `at`: `(length, id)`.
    fn longest_at(&self, bytes: &[u8], at: usize) -> Option<(usize, u32)> {
        let mut node = 0usize;
        let mut best = None;
        for (k, &b) in bytes[at..].iter().enumerate() {
            let children = &self.nodes[node].children;
            match children.binary_search_by_key(&b, |&(c, _)| c) {
                Ok(j) => node = children[j].1 as usize,
                Err(_) => break,
            }
            if let Some(id) = self.nodes[node].id {
                best = Some((k + 1, id));
            }
        }
        best
    }

    fn split<'a>(&self, text: &'a str, out: &mut Vec<Piece<'a>>) {
        if self.nodes.len() == 1 {
            if !text.is_empty() {
                out.push(Piece::Text(text));
            }
            return;
        }
        let bytes = text.as_bytes();
        let (mut start, mut i) = (0, 0);
        while i < bytes.len() {
            if self.first[bytes[i] as usize] {
                if let Some((len, id)) = self.longest_at(bytes, i) {
                    if start < i {
                        out.push(Piece::Text(&text[start..i]));
                    }
                    out.push(Piece::Token(id));
                    i += len;
                    start = i;
                    continue;
                }
            }
            i += 1;
        }
        if start < bytes.len() {
            out.push(Piece::Text(&text[start..]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A small fast hasher for the vocabulary and merge tables (the FxHash mixing step): SipHash
// dominated the build of a 262k-token vocabulary and its ~500k merges.

#[derive(Default, Clone, Copy)]
struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A small SentencePiece-style vocabulary in GGUF form.
    fn vocab() -> GgufVocab {
        let mut tokens: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]
            .iter()
            .chain(&["<end_of_turn>", "\n", "  ", "<b>"])
            .map(|s| s.to_string())
            .collect();
        let mut types = vec![3, 3, 3, 2, 3, 3, 4, 4, 4];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        for t in [
            "a",
            "b",
            "c",
            "ab",
            "bc",
            "abc",
            "\u{2581}",
            "\u{2581}a",
            "\u{2581}\u{2581}a",
        ] {
            tokens.push(t.to_string());
            types.push(1);
        }
        GgufVocab {
            model: "llama".into(),
            scores: vec![0.0; tokens.len()],
            tokens,
            types,
            bos: Some(2),
            eos: Some(1),
            pad: Some(0),
            unk: Some(3),
            ..Default::default()
        }
    }

    fn names(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| tok.id_to_token(i).unwrap().to_string())
            .collect()
    }

    #[test]
    fn merges_follow_file_order_and_longer_left_part() {
        let tok = Tokenizer::from_gguf_vocab(vocab()).unwrap();
        // "ab" (listed before "bc") merges first; then "ab"+"c" -> "abc".
        assert_eq!(names(&tok, &tok.encode("abc", false)), ["abc"]);
        assert_eq!(names(&tok, &tok.encode("abcab", false)), ["abc", "ab"]);
        assert_eq!(names(&tok, &tok.encode("bcc", false)), ["bc", "c"]);
        // The whitespace run "  " is respelled "▁▁" and so built by merges, not matched raw:
        // listed early, it merges before "▁a" and leads to "▁▁a".
        assert_eq!(tok.id_to_token(7), Some("\u{2581}\u{2581}"));
        assert_eq!(
            names(&tok, &tok.encode("  a", false)),
            ["\u{2581}\u{2581}a"]
        );
        assert_eq!(
            names(&tok, &tok.encode("   a", false)),
            ["\u{2581}\u{2581}", "\u{2581}a"]
        );
        assert_eq!(
            tok.encode(" a", true),
            vec![2, tok.token_to_id("\u{2581}a").unwrap()]
        );
    }

    #[test]
    fn byte_fallback_and_specials() {
        let tok = Tokenizer::from_gguf_vocab(vocab()).unwrap();
        let ids = tok.encode("<start_of_turn>a\n\u{e9}<b>", false);
        assert_eq!(
            names(&tok, &ids),
            ["<start_of_turn>", "a", "\n", "<0xC3>", "<0xA9>", "<b>"]
        );
        assert_eq!(tok.decode(&ids, false), "<start_of_turn>a\n\u{e9}<b>");
        assert_eq!(
            tok.decode(&ids, true),
            "a\n\u{e9}<b>",
            "only specials are skipped"
        );
        assert_eq!(tok.token_kind(ids[3]), Some(TokenKind::Byte));
        // An invalid byte run decodes to one U+FFFD per byte; unknown ids are skipped.
        let c3 = tok.token_to_id("<0xC3>").unwrap();
        let ff = tok.token_to_id("<0xFF>").unwrap();
        assert_eq!(tok.decode(&[c3, ff, 1_000_000], false), "\u{fffd}\u{fffd}");
        assert_eq!((tok.eot_id(), tok.add_bos_by_default()), (Some(5), true));
    }

    #[test]
    fn unknown_characters_without_byte_tokens_fuse_into_unk() {
        let mut v = vocab();
        v.tokens.truncate(9);
        v.types.truncate(9);
        v.scores.truncate(9);
        v.tokens.push("a".into());
        v.types.push(1);
        v.scores.push(0.0);
        let tok = Tokenizer::from_gguf_vocab(v).unwrap();
        assert_eq!(tok.encode("\u{e9}\u{e9}a\u{e9}", false), vec![3, 9, 3]);
    }

    #[test]
    fn gguf_errors_name_the_problem() {
        let mut v = vocab();
        v.model = "gpt2".into();
        let e = Tokenizer::from_gguf_vocab(v).unwrap_err().to_string();
        assert!(e.contains("\"gpt2\""), "{e}");
        let mut v = vocab();
        v.scores.pop();
        let e = Tokenizer::from_gguf_vocab(v).unwrap_err().to_string();
        assert!(e.contains("tokenizer.ggml.scores has"), "{e}");
        let mut v = vocab();
        v.types[10] = 9;
        let e = Tokenizer::from_gguf_vocab(v).unwrap_err().to_string();
        assert!(e.contains("unknown type 9"), "{e}");
        let mut v = vocab();
        v.bos = Some(100_000);
        let e = Tokenizer::from_gguf_vocab(v).unwrap_err().to_string();
        assert!(e.contains("bos_token_id 100000"), "{e}");
    }

    fn json(normalizer: &str, added: &str, merges: &str) -> String {
        format!(
            r#"{{"added_tokens": [{added}], "normalizer": {normalizer}, "pre_tokenizer": null,
                "decoder": null, "post_processor": null,
                "model": {{"type": "BPE", "unk_token": "<unk>", "byte_fallback": true,
                          "vocab": {{"<unk>": 0, "a": 1, "b": 2, "ab": 3}}, "merges": [{merges}]}}}}"#
        )
    }

    #[test]
    fn tokenizer_json_merges_in_both_spellings() {
        for merges in [r#""a b""#, r#"["a", "b"]"#] {
            let tok = Tokenizer::from_tokenizer_json_str(&json("null", "", merges), "t").unwrap();
            assert_eq!(tok.encode("abba", false), vec![3, 2, 1]);
            assert_eq!(tok.decode(&[3, 2, 1], false), "abba");
        }
    }

    #[test]
    fn tokenizer_json_outside_the_gemma_family_is_refused() {
        let regex = r#"{"type": "Replace", "pattern": {"Regex": " +"}, "content": " "}"#;
        let nfkc = r#"{"type": "NFKC"}"#;
        let lstrip = r#"{"id": 4, "content": "<x>", "lstrip": true, "special": true}"#;
        for (j, want) in [
            (json(regex, "", ""), "Replace normalizer pattern"),
            (json(nfkc, "", ""), "normalizer \"NFKC\""),
            (json("null", lstrip, ""), "with lstrip"),
            (
                json("null", "", r#""a c""#),
                "\"c\" is not in the vocabulary",
            ),
            (
                json("null", "", "").replace("\"BPE\"", "\"Unigram\""),
                "model type \"Unigram\"",
            ),
        ] {
            let e = Tokenizer::from_tokenizer_json_str(&j, "t.json")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("t.json: ") && e.contains(want), "{e}");
        }
        let e = Tokenizer::from_tokenizer_json("/nonexistent/tokenizer.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
        let e = Tokenizer::from_tokenizer_json_str("{", "bad.json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("bad.json: not valid JSON"), "{e}");
    }

    #[test]
    fn long_inputs_encode_in_n_log_n() {
        let tok = Tokenizer::from_gguf_vocab(vocab()).unwrap();
        let text = "abc".repeat(100_000);
        let t0 = std::time::Instant::now();
        let ids = tok.encode(&text, false);
        assert_eq!(ids.len(), 100_000);
        assert!(
            t0.elapsed().as_secs_f64() < 5.0,
            "300k characters took {:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn python_trim_matches_str_strip() {
        assert_eq!(python_trim("\u{1c}\t x \u{3000}\u{1f}"), "x");
        assert_eq!(python_trim("\u{200b}x"), "\u{200b}x", "U+200B is not space");
    }
}
