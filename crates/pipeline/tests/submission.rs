//! `generate_submission` on the tiny random Gemma-2: every id in input order, greedy output
//! independent of the batching, and a `submission.json` that `rupantor eval` reads back.

use std::path::PathBuf;

use candle_core::Device;
use rupantor_data::Problem;
use rupantor_exec::{extract_code, read_predictions};
use rupantor_model::Tokenizer;
use rupantor_pipeline::{
    generate_programs, generate_submission, write_outputs, write_submission, GenSettings,
};
use rupantor_train::{LoraModel, TrainConfig};

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma_tiny/gemma2")
}

fn problems() -> Vec<Problem> {
    // Out of id order, with prompts of different lengths.
    [
        (7, "add(a, b)"),
        (2, "a much longer instruction: max_of(xs) for a list xs"),
        (5, "neg(x)"),
    ]
    .into_iter()
    .map(|(id, instruction)| Problem {
        id,
        instruction: instruction.into(),
        test_list: vec![format!("assert f({id}) == {id}")],
        response: None,
    })
    .collect()
}

#[test]
fn submission_has_every_id_in_input_order_and_reads_back() {
    let tok = Tokenizer::from_tokenizer_json(tiny().join("tokenizer.json")).unwrap();
    let spec = TrainConfig {
        rank: 4,
        alpha: 8.0,
        ..TrainConfig::default()
    }
    .lora_spec()
    .unwrap();
    let model = LoraModel::load(&tiny(), &Device::Cpu, spec).unwrap();
    let settings = GenSettings {
        max_new_tokens: 10,
        batch: 3,
        progress: false,
        ..GenSettings::default()
    };
    let ps = problems();
    let rows = generate_submission(model.model(), &tok, &ps, &settings).unwrap();
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [7, 2, 5]);

    // Greedy: one prompt per batch gives the same programs as all three in one.
    let single = generate_programs(
        model.model(),
        &tok,
        &ps,
        &GenSettings {
            batch: 1,
            ..settings.clone()
        },
    )
    .unwrap();
    assert_eq!(
        single
            .outputs
            .iter()
            .map(|o| (o.id, o.response.clone()))
            .collect::<Vec<_>>(),
        rows
    );
    assert!(single.tokens > 0);
    assert!(single.outputs.iter().all(|o| o.tokens <= 10));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("test/submission.json");
    write_submission(&path, &rows).unwrap();
    let back = read_predictions(&path).unwrap();
    assert_eq!(back.iter().map(|p| p.id).collect::<Vec<_>>(), [7, 2, 5]);
    for (p, (_, program)) in back.iter().zip(&rows) {
        assert!(p.response.starts_with("```python\n"), "{:?}", p.response);
        assert_eq!(extract_code(&p.response), program.trim_end());
    }

    // The JSONL form of the same outputs.
    let jsonl = dir.path().join("dev.jsonl");
    write_outputs(&jsonl, &single.outputs).unwrap();
    let back = read_predictions(&jsonl).unwrap();
    assert_eq!(
        back.into_iter()
            .map(|p| (p.id, p.response))
            .collect::<Vec<_>>(),
        rows
    );

    // A prompt that cannot fit the context is refused before anything is generated.
    let long = GenSettings {
        max_new_tokens: 600,
        ..settings
    };
    let e = generate_submission(model.model(), &tok, &ps, &long).unwrap_err();
    assert!(
        e.to_string().contains("exceeds the model's context of 512"),
        "{e}"
    );
}

#[test]
fn a_reply_stops_at_every_special_token_and_only_there() {
    let tok = Tokenizer::from_tokenizer_json(tiny().join("tokenizer.json")).unwrap();
    let ids = rupantor_pipeline::generate::stop_ids(&tok);
    assert_eq!(ids[0], tok.token_to_id("<end_of_turn>").unwrap());
    for name in ["<start_of_turn>", "<eos>", "<bos>", "<pad>"] {
        let id = tok.token_to_id(name).unwrap();
        assert!(ids.contains(&id), "{name} ({id}) is not a stop id: {ids:?}");
    }
    let plain = tok.encode("def f(x):\n    return x", false);
    assert!(
        plain.iter().all(|t| !ids.contains(t)),
        "{plain:?} vs {ids:?}"
    );
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "no id twice");
}
