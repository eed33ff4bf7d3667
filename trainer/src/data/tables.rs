//! Rows of tabular data files as JSON objects, one per example, for the record layouts of
//! [`super::Format`]: CSV (a header row names the columns; every cell is text, and a cell of a
//! column that holds conversations is JSON) and Parquet (what the Hugging Face `datasets`
//! library writes: strings, numbers, and lists of structs for conversations), read with the
//! `csv` and `parquet` crates.

use std::fs::File;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::{Map, Value};

use super::DataError;

/// The rows of a CSV file: each a map of its header's column names to the cells as strings.
pub fn csv_rows(path: &Path) -> Result<Vec<Value>, DataError> {
    let file = path.display();
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .from_path(path)
        .map_err(|e| DataError(format!("{file}: {e}")))?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| DataError(format!("{file}: the header row: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        // Row 1 is the first after the header, as a spreadsheet counts data rows.
        let record = record.map_err(|e| DataError(format!("{file}: row {}: {e}", i + 1)))?;
        let row: Map<String, Value> = header
            .iter()
            .zip(record.iter())
            .map(|(k, v)| (k.clone(), Value::String(v.to_string())))
            .collect();
        rows.push(Value::Object(row));
    }
    Ok(rows)
}

/// The rows of a Parquet file as JSON objects (nested lists and structs as arrays and
/// objects).
///
/// The `parquet` crate asserts its way through some malformed files (seeded fuzzing finds
/// panics in its bit unpacking, column-chunk offsets and dictionary decoding); such a file is
/// an error naming it, like any other that is not Parquet.
pub fn parquet_rows(path: &Path) -> Result<Vec<Value>, DataError> {
    ft_model::caught::catch(|| read_parquet(path)).unwrap_or_else(|why| {
        Err(DataError(format!(
            "{}: not a Parquet file ft can read (its reader failed: {why})",
            path.display()
        )))
    })
}

fn read_parquet(path: &Path) -> Result<Vec<Value>, DataError> {
    let file = path.display();
    let bad =
        |e: parquet::errors::ParquetError| DataError(format!("{file}: not a Parquet file: {e}"));
    let reader =
        SerializedFileReader::new(File::open(path).map_err(|e| DataError(format!("{file}: {e}")))?)
            .map_err(bad)?;
    let rows = reader.metadata().file_metadata().num_rows();
    let mut out = Vec::with_capacity(usize::try_from(rows).unwrap_or(0).min(1 << 20));
    for (i, row) in reader.get_row_iter(None).map_err(bad)?.enumerate() {
        let row = row.map_err(|e| DataError(format!("{file}: row {}: {e}", i + 1)))?;
        out.push(row.to_json_value());
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    use super::*;

    /// A Parquet file of string columns, written with the `parquet` crate.
    pub(crate) fn write_parquet(path: &Path, columns: &[(&str, Vec<&str>)]) {
        let fields: String = columns
            .iter()
            .map(|(name, _)| format!("REQUIRED BYTE_ARRAY {name} (UTF8);"))
            .collect();
        let schema = Arc::new(parse_message_type(&format!("message rows {{ {fields} }}")).unwrap());
        let props = Arc::new(WriterProperties::builder().build());
        let mut writer =
            SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
        let mut group = writer.next_row_group().unwrap();
        for (_, values) in columns {
            let mut column = group.next_column().unwrap().unwrap();
            let values: Vec<ByteArray> = values.iter().map(|v| ByteArray::from(*v)).collect();
            column
                .typed::<ByteArrayType>()
                .write_batch(&values, None, None)
                .unwrap();
            column.close().unwrap();
        }
        group.close().unwrap();
        writer.close().unwrap();
    }

    #[test]
    fn parquet_rows_come_back_as_objects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        write_parquet(&path, &[("q", vec!["a", "b"]), ("a", vec!["1", "2"])]);
        let rows = parquet_rows(&path).unwrap();
        assert_eq!(
            rows,
            [
                serde_json::json!({"q": "a", "a": "1"}),
                serde_json::json!({"q": "b", "a": "2"})
            ]
        );
    }

    #[test]
    fn files_the_parquet_reader_panics_on_are_errors() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/data");
        for (name, why) in [
            ("malformed-bit-unpacking.parquet", "size <= src.len()"),
            ("malformed-chunk-offset.parquet", "should not be negative"),
            ("malformed-dictionary.parquet", "Decoder for dict"),
        ] {
            let err = parquet_rows(&fixtures.join(name)).unwrap_err().to_string();
            assert!(
                err.contains("not a Parquet file ft can read") && err.contains(why),
                "{err}"
            );
            assert!(
                !ft_model::caught::catching(),
                "the flag is cleared after the read"
            );
        }
    }

    #[test]
    fn csv_rows_are_keyed_by_the_header_and_bad_rows_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "q,a\n\"x, y\",1\nz,2\n").unwrap();
        let rows = csv_rows(&path).unwrap();
        assert_eq!(rows[0], serde_json::json!({"q": "x, y", "a": "1"}));
        std::fs::write(&path, "q,a\nx,1\ny\n").unwrap();
        let err = csv_rows(&path).unwrap_err().to_string();
        assert!(err.contains("t.csv: row 2"), "{err}");
        std::fs::write(&path, "not parquet").unwrap();
        let err = parquet_rows(&path).unwrap_err().to_string();
        assert!(err.contains("not a Parquet file"), "{err}");
    }
}
