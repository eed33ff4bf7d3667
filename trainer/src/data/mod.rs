//! Training data: records in four formats, from JSONL, CSV or Parquet files or a dataset on
//! the Hugging Face Hub ([`hub`]), their columns mapped onto the format's fields; turned into
//! token ids with a loss mask, then into padded or packed micro-batches.
//!
//! - `text`: `{"text": ...}`, every token trained.
//! - `completion`: `{"prompt": ..., "completion": ...}`, the completion trained.
//! - `alpaca`: `{"instruction", "input", "output"}`, rendered with the Alpaca prompt (Taori et
//!   al. 2023), the output trained.
//! - `chat`: `{"messages": [{"role", "content"}, ...]}`, rendered with the model's chat template;
//!   only assistant turns are trained.
//!
//! EOS ends every text, completion and alpaca example (a chat template ends turns itself).
//! Prompt tokens are masked out of the loss unless `train_on_prompt`.

pub mod hub;
pub mod tables;

use std::collections::BTreeMap;
use std::path::Path;

use ft_model::chat::{ChatTemplate, Message};
use ft_model::TextTokenizer;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The record layout of a JSONL file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `{"text"}`
    Text,
    /// `{"prompt", "completion"}`
    Completion,
    /// `{"instruction", "input", "output"}`
    Alpaca,
    /// `{"messages": [{"role", "content"}]}`
    Chat,
}

/// One record: text pieces, each with whether its tokens are trained.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Plain text.
    Text(String),
    /// A prompt and the completion to learn.
    Completion {
        /// Conditioning text.
        prompt: String,
        /// Text to learn.
        completion: String,
    },
    /// A conversation.
    Chat(Vec<Message>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextRow {
    text: String,
}

#[derive(Deserialize)]
struct CompletionRow {
    prompt: String,
    completion: String,
}

#[derive(Deserialize)]
struct AlpacaRow {
    instruction: String,
    #[serde(default)]
    input: String,
    output: String,
}

#[derive(Deserialize)]
struct ChatRow {
    messages: Vec<Message>,
}

/// The Alpaca prompt (Stanford Alpaca's `PROMPT_DICT`), with and without input.
fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// A data error naming the file and line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DataError(pub String);

impl Format {
    /// The fields of a record, as columns are mapped onto them (`data.columns`).
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            Self::Text => &["text"],
            Self::Completion => &["prompt", "completion"],
            Self::Alpaca => &["instruction", "input", "output"],
            Self::Chat => &["messages"],
        }
    }
}

/// The record of one JSON object in `format`; `at` (file and line or row) names it in errors.
fn record(value: Value, format: Format, at: &str) -> Result<Record, DataError> {
    let bad = |e: serde_json::Error| DataError(format!("{at}: not a {format:?} record: {e}"));
    Ok(match format {
        Format::Text => Record::Text(serde_json::from_value::<TextRow>(value).map_err(bad)?.text),
        Format::Completion => {
            let r: CompletionRow = serde_json::from_value(value).map_err(bad)?;
            Record::Completion {
                prompt: r.prompt,
                completion: r.completion,
            }
        }
        Format::Alpaca => {
            let r: AlpacaRow = serde_json::from_value(value).map_err(bad)?;
            Record::Completion {
                prompt: alpaca_prompt(&r.instruction, &r.input),
                completion: r.output,
            }
        }
        Format::Chat => {
            let r: ChatRow = serde_json::from_value(value).map_err(bad)?;
            if !r.messages.iter().any(|m| m.role == "assistant") {
                return Err(DataError(format!(
                    "{at}: a chat record needs at least one assistant message"
                )));
            }
            Record::Chat(r.messages)
        }
    })
}

/// Parses JSONL `text` (named `file` in errors) in `format`, each object's keys renamed by
/// `columns` (field -> key) first.
pub fn parse_jsonl(
    text: &str,
    format: Format,
    columns: &BTreeMap<String, String>,
    file: &str,
) -> Result<Vec<Record>, DataError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{file}:{}", i + 1);
        let value: Value = serde_json::from_str(line)
            .map_err(|e| DataError(format!("{at}: not a {format:?} record: {e}")))?;
        let value = if columns.is_empty() {
            value
        } else {
            project(&value, format, columns, &at)?
        };
        out.push(record(value, format, &at)?);
    }
    if out.is_empty() {
        return Err(DataError(format!("{file}: no records")));
    }
    Ok(out)
}

/// The fields of `format` taken from a row's columns (`columns` maps a field to its column;
/// unmapped fields are columns of their own name): text fields as strings (numbers and
/// booleans as their text), a conversation as a list (or its JSON in a string, as CSV holds
/// it). Other columns are left out.
fn project(
    row: &Value,
    format: Format,
    columns: &BTreeMap<String, String>,
    at: &str,
) -> Result<Value, DataError> {
    let Some(cells) = row.as_object() else {
        return Err(DataError(format!("{at}: not an object: {row}")));
    };
    let mut out = serde_json::Map::new();
    for &field in format.fields() {
        let column = columns.get(field).map_or(field, String::as_str);
        let named = if column == field {
            format!("column {column:?}")
        } else {
            format!("column {column:?} (data.columns: {field} = {column:?})")
        };
        let Some(cell) = cells.get(column) else {
            if field == "input" {
                continue;
            }
            let have: Vec<&str> = cells.keys().map(String::as_str).collect();
            return Err(DataError(format!(
                "{at}: no {named} for the {format:?} field {field}; the columns are {}",
                have.join(", ")
            )));
        };
        let value = match (field, cell) {
            ("messages", Value::Array(_)) => cell.clone(),
            ("messages", Value::String(json)) => serde_json::from_str(json).map_err(|e| {
                DataError(format!("{at}: {named}: not a JSON list of messages: {e}"))
            })?,
            (_, Value::String(_)) => cell.clone(),
            (_, Value::Number(n)) => Value::String(n.to_string()),
            (_, Value::Bool(b)) => Value::String(b.to_string()),
            (_, Value::Null) if field == "input" => Value::String(String::new()),
            (_, other) => {
                return Err(DataError(format!(
                    "{at}: {named}: expected {}, got {other}",
                    if field == "messages" {
                        "a list of messages"
                    } else {
                        "text"
                    }
                )))
            }
        };
        out.insert(field.to_string(), value);
    }
    Ok(Value::Object(out))
}

/// The records of rows read from a table (`file` names it in errors, each row by its number
/// from 1).
fn table_records(
    rows: Vec<Value>,
    format: Format,
    columns: &BTreeMap<String, String>,
    file: &str,
) -> Result<Vec<Record>, DataError> {
    let records = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let at = format!("{file}: row {}", i + 1);
            record(project(row, format, columns, &at)?, format, &at)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if records.is_empty() {
        return Err(DataError(format!("{file}: no records")));
    }
    Ok(records)
}

/// The records of a data source in `format`: `hf:datasets/OWNER/NAME[@REV][#SPLIT]`, or a
/// file read by its extension (`.parquet`, `.csv`, else JSONL), `columns` mapping the format's
/// fields to the source's columns. `path` is the file as resolved (relative paths against
/// the recipe's folder); a Hub source is given as written.
pub fn read(
    path: &Path,
    format: Format,
    columns: &BTreeMap<String, String>,
) -> Result<Vec<Record>, DataError> {
    let name = path.display().to_string();
    if let Some(dataset) = path.to_str().and_then(hub::HubDataset::parse) {
        let dataset = dataset?;
        let mut records = Vec::new();
        for file in dataset.files()? {
            let rows = tables::parquet_rows(&file)?;
            records.extend(table_records(
                rows,
                format,
                columns,
                &file.display().to_string(),
            )?);
        }
        return Ok(records);
    }
    match path.extension().and_then(|x| x.to_str()) {
        Some("parquet") => table_records(tables::parquet_rows(path)?, format, columns, &name),
        Some("csv") => table_records(tables::csv_rows(path)?, format, columns, &name),
        _ => {
            let text =
                std::fs::read_to_string(path).map_err(|e| DataError(format!("{name}: {e}")))?;
            parse_jsonl(&text, format, columns, &name)
        }
    }
}

/// Token ids with, for each, whether the model is trained to predict it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    /// Token ids.
    pub ids: Vec<u32>,
    /// `train[i]`: the loss includes predicting `ids[i]` from `ids[..i]`.
    pub train: Vec<bool>,
}

impl Tokenized {
    /// Ids whose every token is predicted (scored) from the ones before it.
    pub fn all_trained(ids: Vec<u32>) -> Self {
        Self {
            train: vec![true; ids.len()],
            ids,
        }
    }
}

/// What tokenization needs from the model.
pub struct Encoder<'a> {
    /// The tokenizer.
    pub tokenizer: &'a TextTokenizer,
    /// The chat template (for `chat` records).
    pub template: Option<&'a ChatTemplate>,
    /// Appended to text/completion examples.
    pub eos: Option<u32>,
    /// Train on prompt tokens too.
    pub train_on_prompt: bool,
    /// Longer examples are cut to this many tokens.
    pub max_seq_len: usize,
}

impl Encoder<'_> {
    /// The texts a record is trained as, in order, each with whether its tokens carry the
    /// loss: a completion's prompt and completion, a conversation as its chat template renders
    /// it turn by turn. Each piece is tokenized on its own; [`Self::encode`] then appends the
    /// EOS to text and completion records.
    pub fn pieces(&self, record: &Record) -> Result<Vec<(String, bool)>, DataError> {
        let mut pieces = Vec::new();
        match record {
            Record::Text(text) => pieces.push((text.clone(), true)),
            Record::Completion { prompt, completion } => {
                pieces.push((prompt.clone(), self.train_on_prompt));
                pieces.push((completion.clone(), true));
            }
            Record::Chat(messages) => {
                let template = self.template.ok_or_else(|| {
                    DataError("chat data needs a model with a chat template".into())
                })?;
                let render = |m: &[Message], gen: bool| {
                    template
                        .render(
                            m,
                            gen,
                            self.tokenizer.bos_token.as_deref(),
                            self.tokenizer.eos_token.as_deref(),
                        )
                        .map_err(|e| DataError(e.to_string()))
                };
                // Each assistant turn is the difference between the conversation rendered
                // through it and the one rendered up to its opener.
                let mut done = String::new();
                for (k, m) in messages.iter().enumerate() {
                    if m.role != "assistant" {
                        continue;
                    }
                    let opener = render(&messages[..k], true)?;
                    let through = render(&messages[..=k], false)?;
                    let prompt = opener.strip_prefix(done.as_str()).unwrap_or(&opener);
                    pieces.push((prompt.to_string(), self.train_on_prompt));
                    let answer = through.strip_prefix(opener.as_str()).unwrap_or(&through);
                    pieces.push((answer.to_string(), true));
                    done = through;
                }
            }
        }
        Ok(pieces)
    }

    /// The EOS appended to text and completion records (none to chat records, whose template
    /// ends each turn).
    pub fn eos_after(&self, record: &Record) -> Option<u32> {
        self.eos.filter(|_| !matches!(record, Record::Chat(_)))
    }

    /// Tokenizes one record; returns it and whether it was truncated.
    pub fn encode(&self, record: &Record) -> Result<(Tokenized, bool), DataError> {
        let mut t = Tokenized {
            ids: Vec::new(),
            train: Vec::new(),
        };
        for (text, train) in self.pieces(record)? {
            let ids = self
                .tokenizer
                .encode(&text)
                .map_err(|e| DataError(e.to_string()))?;
            t.train.extend(std::iter::repeat_n(train, ids.len()));
            t.ids.extend(ids);
        }
        if let Some(eos) = self.eos_after(record) {
            t.ids.push(eos);
            t.train.push(true);
        }
        let truncated = t.ids.len() > self.max_seq_len;
        t.ids.truncate(self.max_seq_len);
        t.train.truncate(self.max_seq_len);
        Ok((t, truncated))
    }
}

/// One micro-batch, laid out on the host: `b` rows of `s` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Rows.
    pub b: usize,
    /// Tokens per row.
    pub s: usize,
    /// `[b * s]` token ids (padding repeats `pad`).
    pub ids: Vec<u32>,
    /// Per row, the document id of each token (padding has its own).
    pub segments: Vec<Vec<u32>>,
    /// Per row, each token's position within its document.
    pub positions: Vec<Vec<u32>>,
    /// `(flat index of the predicting position, target id)` for every trained token.
    pub targets: Vec<(usize, u32)>,
    /// Tokens that are not padding.
    pub real_tokens: usize,
    /// Indices of the training examples laid out, in document order (empty when the batch
    /// was not drawn from the training set): the offline teacher cache is keyed by them.
    pub examples: Vec<usize>,
}

impl Batch {
    /// Lays out `rows`, each a list of documents, padded to the longest row with `pad`.
    pub fn new(rows: &[Vec<&Tokenized>], pad: u32) -> Self {
        Self::with_buckets(rows, pad, &[])
    }

    /// Lays out `rows` padded with `pad` to the smallest of `buckets` (increasing lengths)
    /// that holds the longest row, or to the longest row when none does.
    ///
    /// Padding is invisible to the loss: it has a segment of its own (no real token attends
    /// to it) and no targets. Its positions count from 0 but stop at the longest row's last
    /// position, so that a bucket longer than the model's context (the data is cut to the
    /// context, `data.max_seq_len` need not be) never reads past the rotary table.
    pub fn with_buckets(rows: &[Vec<&Tokenized>], pad: u32, buckets: &[usize]) -> Self {
        let longest = rows
            .iter()
            .map(|docs| docs.iter().map(|d| d.ids.len()).sum::<usize>())
            .max()
            .unwrap_or(0)
            .max(1);
        let s = bucket(buckets, longest);
        let b = rows.len();
        let mut batch = Batch {
            b,
            s,
            ids: Vec::with_capacity(b * s),
            segments: Vec::with_capacity(b),
            positions: Vec::with_capacity(b),
            targets: Vec::new(),
            real_tokens: 0,
            examples: Vec::new(),
        };
        for (r, docs) in rows.iter().enumerate() {
            let (mut segments, mut positions) = (Vec::with_capacity(s), Vec::with_capacity(s));
            for (d, doc) in docs.iter().enumerate() {
                let start = r * s + segments.len();
                for (i, (&id, &train)) in doc.ids.iter().zip(&doc.train).enumerate() {
                    if i > 0 && train {
                        batch.targets.push((start + i - 1, id));
                    }
                    batch.ids.push(id);
                    segments.push(d as u32);
                    positions.push(i as u32);
                }
            }
            let used = segments.len();
            batch.real_tokens += used;
            for i in used..s {
                batch.ids.push(pad);
                segments.push(docs.len() as u32);
                positions.push((i - used).min(longest - 1) as u32);
            }
            batch.segments.push(segments);
            batch.positions.push(positions);
        }
        batch
    }

    /// Trained tokens in the batch.
    pub fn loss_tokens(&self) -> usize {
        self.targets.len()
    }
}

/// The padded length of a micro-batch whose longest row has `len` tokens: the smallest of
/// `buckets` (increasing) that holds it, or `len` itself when none does (no buckets).
pub fn bucket(buckets: &[usize], len: usize) -> usize {
    buckets.iter().copied().find(|&b| b >= len).unwrap_or(len)
}

/// Groups items of the given token lengths into rows: one item per row, or packed greedily
/// in order into rows of at most `max_seq_len` tokens (an item never spans two rows).
/// Returns the item indices of each row.
pub fn rows(lengths: &[usize], packing: bool, max_seq_len: usize) -> Vec<Vec<usize>> {
    if !packing {
        return (0..lengths.len()).map(|i| vec![i]).collect();
    }
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut used = 0;
    for (i, &n) in lengths.iter().enumerate() {
        match out.last_mut() {
            Some(row) if used + n <= max_seq_len => {
                row.push(i);
                used += n;
            }
            _ => {
                out.push(vec![i]);
                used = n;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use ft_model::tiny::{tiny_config, write_hf_folder, CHATML_TEMPLATE};
    use ft_model::LlamaForCausalLM;

    use super::*;

    /// The tiny model's byte-level tokenizer: byte b is id b; 258 is `<|im_end|>`.
    fn tokenizer() -> TextTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let model =
            LlamaForCausalLM::<NdArray<f32>>::init_random(&tiny_config(), &Default::default());
        write_hf_folder(&model, &tiny_config(), dir.path()).unwrap();
        let path = dir.path().join("tokenizer.json");
        TextTokenizer::from_file(&path, vec![258], None, Some("<|im_end|>".into())).unwrap()
    }

    fn encoder<'a>(
        t: &'a TextTokenizer,
        template: Option<&'a ChatTemplate>,
        train_on_prompt: bool,
    ) -> Encoder<'a> {
        Encoder {
            tokenizer: t,
            template,
            eos: Some(258),
            train_on_prompt,
            max_seq_len: 64,
        }
    }

    #[test]
    fn columns_map_onto_fields_and_name_what_is_missing() {
        let columns: BTreeMap<String, String> = [("prompt", "question"), ("completion", "answer")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        let r = parse_jsonl(
            "{\"question\": \"1+1?\", \"answer\": 2, \"id\": 7}",
            Format::Completion,
            &columns,
            "q.jsonl",
        )
        .unwrap();
        assert_eq!(
            r,
            [Record::Completion {
                prompt: "1+1?".into(),
                completion: "2".into()
            }]
        );
        let e = parse_jsonl(
            "{\"question\": \"x\"}",
            Format::Completion,
            &columns,
            "q.jsonl",
        )
        .unwrap_err();
        assert!(
            e.0.starts_with(
                "q.jsonl:1: no column \"answer\" (data.columns: completion = \"answer\")"
            ),
            "{}",
            e.0
        );
        let rows = vec![serde_json::json!({"question": "x", "answer": null})];
        let e = table_records(rows, Format::Completion, &columns, "t.parquet").unwrap_err();
        assert!(
            e.0.starts_with("t.parquet: row 1: column \"answer\""),
            "{}",
            e.0
        );
        assert!(e.0.ends_with("expected text, got null"), "{}", e.0);
        // A conversation kept as JSON text in a CSV cell.
        let rows = vec![serde_json::json!({
            "messages": "[{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]"
        })];
        let r = table_records(rows, Format::Chat, &BTreeMap::new(), "c.csv").unwrap();
        assert!(matches!(&r[0], Record::Chat(m) if m.len() == 2));
    }

    #[test]
    fn parquet_and_csv_files_are_read_by_their_extension() {
        let dir = tempfile::tempdir().unwrap();
        let parquet = dir.path().join("t.parquet");
        tables::tests::write_parquet(
            &parquet,
            &[("question", vec!["a?", "b?"]), ("answer", vec!["A", "B"])],
        );
        let columns: BTreeMap<String, String> = [("prompt", "question"), ("completion", "answer")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        let r = read(&parquet, Format::Completion, &columns).unwrap();
        assert_eq!(r.len(), 2);
        let csv = dir.path().join("t.csv");
        std::fs::write(&csv, "text\nhello\nworld\n").unwrap();
        let r = read(&csv, Format::Text, &BTreeMap::new()).unwrap();
        assert_eq!(
            r,
            [Record::Text("hello".into()), Record::Text("world".into())]
        );
    }

    #[test]
    fn each_format_parses_and_bad_lines_name_file_and_line() {
        let _turn = crate::f64_tensors();
        let r = parse_jsonl(
            "{\"text\": \"hi\"}\n\n{\"text\": \"yo\"}\n",
            Format::Text,
            &BTreeMap::new(),
            "a.jsonl",
        )
        .unwrap();
        assert_eq!(
            r,
            vec![Record::Text("hi".into()), Record::Text("yo".into())]
        );
        let r = parse_jsonl(
            "{\"instruction\": \"Add\", \"input\": \"1 2\", \"output\": \"3\"}",
            Format::Alpaca,
            &BTreeMap::new(),
            "a",
        )
        .unwrap();
        let Record::Completion { prompt, completion } = &r[0] else {
            panic!()
        };
        assert!(prompt.ends_with("### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n"));
        assert_eq!(completion, "3");
        let e = parse_jsonl(
            "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": 1}\n",
            Format::Completion,
            &BTreeMap::new(),
            "c.jsonl",
        )
        .unwrap_err();
        assert!(
            e.0.starts_with("c.jsonl:2: not a Completion record"),
            "{}",
            e.0
        );
        let e = parse_jsonl(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}",
            Format::Chat,
            &BTreeMap::new(),
            "d.jsonl",
        )
        .unwrap_err();
        assert_eq!(
            e.0,
            "d.jsonl:1: a chat record needs at least one assistant message"
        );
    }

    #[test]
    fn prompts_are_masked_and_eos_appended() {
        let _turn = crate::f64_tensors();
        let t = tokenizer();
        let rec = Record::Completion {
            prompt: "ab".into(),
            completion: "cd".into(),
        };
        let (x, cut) = encoder(&t, None, false).encode(&rec).unwrap();
        assert_eq!(x.ids, vec![97, 98, 99, 100, 258]);
        assert_eq!(x.train, vec![false, false, true, true, true]);
        assert!(!cut);
        let (x, _) = encoder(&t, None, true).encode(&rec).unwrap();
        assert!(x.train.iter().all(|&b| b));
        let mut short = encoder(&t, None, false);
        short.max_seq_len = 3;
        let (x, cut) = short.encode(&rec).unwrap();
        assert_eq!((x.ids.len(), cut), (3, true));
    }

    #[test]
    fn chat_trains_only_assistant_turns() {
        let _turn = crate::f64_tensors();
        let t = tokenizer();
        let template = ChatTemplate::new(CHATML_TEMPLATE).unwrap();
        let msg = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
        };
        let rec = Record::Chat(vec![
            msg("user", "hi"),
            msg("assistant", "yo"),
            msg("user", "q"),
            msg("assistant", "a"),
        ]);
        let (x, _) = encoder(&t, Some(&template), false).encode(&rec).unwrap();
        let text = t.decode(&x.ids).unwrap();
        assert_eq!(text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n");
        let trained: Vec<u32> = x
            .ids
            .iter()
            .zip(&x.train)
            .filter(|(_, &t)| t)
            .map(|(&i, _)| i)
            .collect();
        assert_eq!(t.decode(&trained).unwrap(), "yo<|im_end|>\na<|im_end|>\n");
    }

    /// A document of three tokens whose first is context, and one of two, all trained.
    fn two_documents() -> (Tokenized, Tokenized) {
        let a = Tokenized {
            ids: vec![1, 2, 3],
            train: vec![false, true, true],
        };
        let b = Tokenized {
            ids: vec![4, 5],
            train: vec![true, true],
        };
        (a, b)
    }

    #[test]
    fn padded_and_packed_batches_lay_out_targets_segments_and_positions() {
        let _turn = crate::f64_tensors();
        let (a, b) = two_documents();
        let padded = Batch::new(&[vec![&a], vec![&b]], 0);
        assert_eq!((padded.b, padded.s), (2, 3));
        assert_eq!(padded.ids, vec![1, 2, 3, 4, 5, 0]);
        assert_eq!(padded.targets, vec![(0, 2), (1, 3), (3, 5)]);
        assert_eq!(padded.segments[1], vec![0, 0, 1]);
        assert_eq!(padded.real_tokens, 5);
        let docs = [&a, &b, &a];
        let rows = rows(&[3, 2, 3], true, 5);
        assert_eq!(rows, vec![vec![0, 1], vec![2]]);
        let rows: Vec<Vec<&Tokenized>> = rows
            .iter()
            .map(|r| r.iter().map(|&i| docs[i]).collect())
            .collect();
        let packed = Batch::new(&rows, 0);
        assert_eq!(packed.s, 5);
        assert_eq!(packed.segments[0], vec![0, 0, 0, 1, 1]);
        assert_eq!(packed.positions[0], vec![0, 1, 2, 0, 1]);
        // No target crosses from one document into the next.
        assert_eq!(&packed.targets[..3], &[(0, 2), (1, 3), (3, 5)]);
    }

    #[test]
    fn lengths_round_up_to_the_next_bucket() {
        let _turn = crate::f64_tensors();
        let buckets = [32, 64, 128];
        for (len, want) in [(1, 32), (31, 32), (32, 32), (33, 64), (64, 64), (65, 128)] {
            assert_eq!(bucket(&buckets, len), want, "{len}");
        }
        assert_eq!(
            bucket(&buckets, 129),
            129,
            "past the last bucket, the row's own length"
        );
        assert_eq!(bucket(&[], 17), 17, "no buckets");
    }

    #[test]
    fn a_bucketed_batch_only_adds_padding() {
        let _turn = crate::f64_tensors();
        let (a, b) = two_documents();
        let rows = [vec![&a], vec![&b]];
        let tight = Batch::new(&rows, 0);
        let wide = Batch::with_buckets(&rows, 0, &[2, 8, 16]);
        assert_eq!((wide.b, wide.s), (2, 8));
        assert_eq!(
            wide.ids,
            vec![1, 2, 3, 0, 0, 0, 0, 0, 4, 5, 0, 0, 0, 0, 0, 0]
        );
        // The same targets at the same (row, column), and the same real tokens.
        let at = |batch: &Batch| -> Vec<(usize, usize, u32)> {
            let s = batch.s;
            batch
                .targets
                .iter()
                .map(|&(i, t)| (i / s, i % s, t))
                .collect()
        };
        assert_eq!(at(&wide), at(&tight));
        assert_eq!(wide.real_tokens, tight.real_tokens);
        // Padding is its own segment; its positions stop at the longest row's last one.
        assert_eq!(wide.segments[0], vec![0, 0, 0, 1, 1, 1, 1, 1]);
        assert_eq!(wide.positions[0], vec![0, 1, 2, 0, 1, 2, 2, 2]);
        assert_eq!(wide.positions[1], vec![0, 1, 0, 1, 2, 2, 2, 2]);
        for row in 0..2 {
            assert_eq!(tight.segments[row][..], wide.segments[row][..tight.s]);
            assert_eq!(tight.positions[row][..], wide.positions[row][..tight.s]);
        }
    }
}
