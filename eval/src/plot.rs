//! Charts for reports, drawn once and written as SVG and PNG. Text is set in DejaVu Sans,
//! embedded in the binary, so a PNG looks the same on a machine without fonts.

use std::error::Error;
use std::ops::Range;
use std::path::Path;
use std::sync::Once;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{write_atomic, EvalError};

const SIZE: (u32, u32) = (760, 500);
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Makes "sans-serif" DejaVu Sans for every chart.
fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TrueType file; were it not, text would be left out.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// A chart that can be drawn on any plotters backend.
pub trait Chart {
    /// Draws the chart on `root`.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), Box<dyn Error>>
    where
        DB::ErrorType: 'static;

    /// Writes the chart as an SVG file (atomically).
    fn save_svg(&self, path: &Path) -> Result<(), EvalError> {
        fonts();
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
            self.draw(&root)
                .and_then(|()| root.present().map_err(Into::into))
                .map_err(|e| plot_error(path, e))?;
        }
        write_atomic(path, svg.as_bytes())
    }

    /// Writes the chart as a PNG file (atomically).
    fn save_png(&self, path: &Path) -> Result<(), EvalError> {
        fonts();
        let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
            self.draw(&root)
                .and_then(|()| root.present().map_err(Into::into))
                .map_err(|e| plot_error(path, e))?;
        }
        let mut png_bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut png_bytes, SIZE.0, SIZE.1);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .write_header()
            .and_then(|mut w| w.write_image_data(&pixels))
            .map_err(|e| plot_error(path, e))?;
        write_atomic(path, &png_bytes)
    }

    /// Writes `stem.svg` and `stem.png`.
    fn save(&self, stem: &Path) -> Result<(), EvalError> {
        self.save_svg(&stem.with_extension("svg"))?;
        self.save_png(&stem.with_extension("png"))
    }
}

/// A drawing or encoding failure of the chart at `path`.
fn plot_error(path: &Path, e: impl std::fmt::Display) -> EvalError {
    EvalError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The range of `values` padded by a fraction of its span (or by `min_pad`).
fn padded(values: impl Iterator<Item = f64> + Clone, min_pad: f64) -> Range<f64> {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.15).max(min_pad);
    (lo - pad)..(hi + pad)
}

/// A titled chart on `root` with its axes and a faint grid drawn.
fn axes<'a, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    x_range: Range<f64>,
    y_range: Range<f64>,
) -> Result<ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>, Box<dyn Error>>
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, y_range)?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .bold_line_style(BLACK.mix(0.08))
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    Ok(chart)
}

/// Labelled points, e.g. quality against latency or size.
pub struct Scatter {
    /// Title above the chart.
    pub title: String,
    /// X axis label.
    pub x_desc: String,
    /// Y axis label.
    pub y_desc: String,
    /// `(x, y, label)`.
    pub points: Vec<(f64, f64, String)>,
    /// Start the x axis at 0.
    pub x_from_zero: bool,
}

impl Chart for Scatter {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), Box<dyn Error>>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let xs = padded(self.points.iter().map(|p| p.0), 1e-3);
        // Room on the right for the last point's label.
        let x_range = if self.x_from_zero {
            0.0..xs.end.max(1e-3) * 1.25
        } else {
            xs.start..xs.end + (xs.end - xs.start) * 0.25
        };
        let y_range = padded(self.points.iter().map(|p| p.1), 0.02);
        let span = x_range.end - x_range.start;
        let mut chart = axes(
            root,
            &self.title,
            &self.x_desc,
            &self.y_desc,
            x_range,
            y_range,
        )?;
        // Points close in x get their labels stacked so they stay readable.
        chart.draw_series(self.points.iter().enumerate().map(|(i, (x, y, label))| {
            let stacked = self.points[..i]
                .iter()
                .filter(|p| (p.0 - x).abs() < span * 0.04)
                .count() as i32;
            let color = PALETTE[i % PALETTE.len()];
            EmptyElement::at((*x, *y))
                + Circle::new((0, 0), 5, color.filled())
                + Text::new(label.clone(), (10, -6 + 16 * stacked), ("sans-serif", 13))
        }))?;
        Ok(())
    }
}

/// Named lines over a shared x axis, e.g. throughput against concurrency.
pub struct Lines {
    /// Title above the chart.
    pub title: String,
    /// X axis label.
    pub x_desc: String,
    /// Y axis label.
    pub y_desc: String,
    /// `(name, points)`.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

impl Chart for Lines {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), Box<dyn Error>>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let all = self.series.iter().flat_map(|s| s.1.iter().copied());
        let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
        let y_max = all.map(|p| p.1).fold(1e-3, f64::max);
        let mut chart = axes(
            root,
            &self.title,
            &self.x_desc,
            &self.y_desc,
            0.0..x_max * 1.05,
            0.0..y_max * 1.15,
        )?;
        for (i, (name, points)) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.2))
            .label_font(("sans-serif", 13))
            .draw()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_written_as_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let scatter = Scatter {
            title: "t".into(),
            x_desc: "x".into(),
            y_desc: "y".into(),
            points: vec![(0.5, 0.9, "a".into()), (0.7, 0.4, "b".into())],
            x_from_zero: true,
        };
        scatter.save(&dir.path().join("s")).unwrap();
        let lines = Lines {
            title: "t".into(),
            x_desc: "x".into(),
            y_desc: "y".into(),
            series: vec![("a".into(), vec![(1.0, 10.0), (8.0, 30.0)])],
        };
        lines.save(&dir.path().join("l")).unwrap();
        for f in ["s.svg", "l.svg"] {
            let svg = std::fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("<text"), "{f}");
        }
        for f in ["s.png", "l.png"] {
            let png = std::fs::read(dir.path().join(f)).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{f}");
            assert!(png.len() > 2000, "{f} has drawing in it");
        }
    }
}
