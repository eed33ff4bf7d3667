//! Training data beyond JSONL, as a user keeps it: the same examples as JSONL, as Parquet (as
//! the `datasets` library writes it, here with the `parquet` crate), as CSV and as a dataset in
//! the Hugging Face cache, their columns mapped by `data.columns`, train to the same losses;
//! a wrong column is an error that names the file, the row and the column.

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use ft_tests::{ft_bin, tiny, tiny_model, Run};

/// The examples: (question, answer).
fn examples() -> Vec<(String, String)> {
    (0..24)
        .map(|i| (format!("{i} plus one is"), format!(" {}", i + 1)))
        .collect()
}

/// A Parquet file of the examples in two string columns, `question` and `answer`.
fn write_parquet(path: &Path) {
    let schema = parse_message_type(
        "message rows { REQUIRED BYTE_ARRAY question (UTF8); REQUIRED BYTE_ARRAY answer (UTF8); }",
    )
    .unwrap();
    let props = Arc::new(WriterProperties::builder().build());
    let file = File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    for column in [0, 1] {
        let values: Vec<ByteArray> = examples()
            .iter()
            .map(|e| {
                ByteArray::from(if column == 0 {
                    e.0.as_str()
                } else {
                    e.1.as_str()
                })
            })
            .collect();
        let mut writer = group.next_column().unwrap().unwrap();
        writer
            .typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .unwrap();
        writer.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();
}

/// `ft train RECIPE --set ...` with `HF_HOME` set to `hf_home`.
fn train(recipe: &Path, hf_home: &Path, sets: &[String]) -> Run {
    let mut c = Command::new(ft_bin());
    c.arg("train").arg(recipe).env("HF_HOME", hf_home);
    for s in sets {
        c.args(["--set", s]);
    }
    c.output().expect("spawn ft").into()
}

#[test]
fn jsonl_parquet_csv_and_a_hub_dataset_train_to_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (folder, _) = tiny_model(d, &tiny());
    let jsonl: Vec<String> = examples()
        .iter()
        .map(|(q, a)| serde_json::json!({"prompt": q, "completion": a}).to_string())
        .collect();
    std::fs::write(d.join("train.jsonl"), jsonl.join("\n")).unwrap();
    write_parquet(&d.join("train.parquet"));
    let mut csv = String::from("question,answer\n");
    for (q, a) in examples() {
        csv += &format!("{q},{a}\n");
    }
    std::fs::write(d.join("train.csv"), csv).unwrap();
    // The Hugging Face cache after the `datasets` library fetched `me/plus` at main.
    let hf_home = d.join("hf");
    let repo = hf_home.join("hub/datasets--me--plus");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let data = repo.join("snapshots").join(commit).join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_parquet(&data.join("train-00000-of-00001.parquet"));

    let recipe = d.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\nsource = {folder:?}\n\n[lora]\nr = 8\nalpha = 16\ntargets = [\"q_proj\", \"v_proj\"]\n\n[data]\ntrain = \"train.jsonl\"\nformat = \"completion\"\nval_fraction = 0.25\n\n[train]\nmax_steps = 3\nmicro_batch_size = 4\nlr = 0.005\n\n[eval]\nexact_match = false\n"
        ),
    )
    .unwrap();
    let columns = "data.columns={ prompt = \"question\", completion = \"answer\" }".to_string();
    let losses = |name: &str, train_set: &str, mapped: bool| -> Vec<f64> {
        let out = d.join(name);
        let mut sets = vec![
            format!("output.dir={}", out.display()),
            format!("data.train={train_set}"),
        ];
        if mapped {
            sets.push(columns.clone());
        }
        let run = train(&recipe, &hf_home, &sets);
        assert_eq!(run.code, 0, "{name}: {}", run.stderr);
        ft_tests::metrics(&out)
            .iter()
            .map(|v| v["train/loss"].as_f64().unwrap())
            .collect()
    };
    let want = losses("jsonl", "train.jsonl", false);
    assert_eq!(want.len(), 3);
    assert_eq!(losses("parquet", "train.parquet", true), want);
    assert_eq!(losses("csv", "train.csv", true), want);
    assert_eq!(losses("hub", "hf:datasets/me/plus", true), want);

    // A column that is not there: the file, the row and the column, before any step.
    let run = train(
        &recipe,
        &hf_home,
        &[
            "data.train=train.parquet".into(),
            "data.columns={ prompt = \"question\", completion = \"reply\" }".into(),
        ],
    );
    run.fails_with(
        2,
        &[
            "data.train",
            "train.parquet: row 1: no column \"reply\" (data.columns: completion = \"reply\")",
            "the columns are answer, question",
        ],
    );
    let run = train(
        &recipe,
        &hf_home,
        &["data.columns={ question = \"prompt\" }".into()],
    );
    run.fails_with(2, &["data.columns={ question = \"prompt\" }: expected fields of the Completion format (prompt, completion), got \"question\""]);
}
