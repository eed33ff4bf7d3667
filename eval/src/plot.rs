//! Charts for reports, drawn once and written as SVG and PNG. Text is set in DejaVu Sans,
//! embedded in the binary, so a PNG looks the same on a machine without fonts.

use std::error::Error;
use std::ops::Range;
use std::path::Path;
use std::sync::Once;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use crate::error::{write_atomic, EvalError};

/// The whole figure: the plot and, on its right, the legend.
const SIZE: (u32, u32) = (900, 500);

/// Width of the legend panel right of the plot.
const LEGEND_WIDTH: u32 = 190;

/// Colours of the models, in order (Tableau 10: apart from each other, and for the usual
/// colour blindnesses).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Markers of the storages, in order.
#[derive(Debug, Clone, Copy)]
enum Marker {
    Circle,
    Triangle,
    Square,
    Diamond,
}

const MARKERS: [Marker; 4] = [
    Marker::Circle,
    Marker::Triangle,
    Marker::Square,
    Marker::Diamond,
];

/// What a point or a line stands for, and so how it is drawn: a colour for each model, a
/// marker for each storage, and for the decoding a filled or hollow marker and a solid or
/// dashed line. An empty part is not told apart.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// The model (the base, or an adapter): the colour.
    pub model: String,
    /// How its weights are stored (q4, q8, ...): the marker.
    pub storage: String,
    /// How it decodes (greedy, sample): filled and solid for the first, hollow and dashed
    /// for the others.
    pub decoding: String,
}

/// The distinct values of each part of the keys, in the order first seen: the styles, and
/// what the legend lists.
struct Styles {
    models: Vec<String>,
    storages: Vec<String>,
    decodings: Vec<String>,
}

impl Styles {
    fn of<'a>(keys: impl Iterator<Item = &'a Key>) -> Self {
        let mut s = Self {
            models: Vec::new(),
            storages: Vec::new(),
            decodings: Vec::new(),
        };
        for k in keys {
            for (list, v) in [
                (&mut s.models, &k.model),
                (&mut s.storages, &k.storage),
                (&mut s.decodings, &k.decoding),
            ] {
                if !list.contains(v) {
                    list.push(v.clone());
                }
            }
        }
        s
    }

    fn color(&self, k: &Key) -> RGBColor {
        PALETTE[position(&self.models, &k.model) % PALETTE.len()]
    }

    fn marker(&self, k: &Key) -> Marker {
        MARKERS[position(&self.storages, &k.storage) % MARKERS.len()]
    }

    /// Filled markers and solid lines: the first decoding.
    fn plain(&self, k: &Key) -> bool {
        position(&self.decodings, &k.decoding) == 0
    }
}

fn position(list: &[String], v: &str) -> usize {
    list.iter().position(|x| x == v).unwrap_or(0)
}

/// Draws `marker` centred on the pixel `at` of `area`.
fn draw_marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    at: (i32, i32),
    marker: Marker,
    color: RGBColor,
    filled: bool,
) -> Result<(), Box<dyn Error>>
where
    DB::ErrorType: 'static,
{
    // Hollow: white inside a ring two pixels wide, drawn as two one-pixel outlines (a wide
    // stroke comes out ragged on bitmaps).
    let layers: Vec<(i32, ShapeStyle)> = if filled {
        vec![(5, color.filled())]
    } else {
        vec![
            (5, WHITE.filled()),
            (5, color.stroke_width(1)),
            (4, color.stroke_width(1)),
        ]
    };
    let (x, y) = at;
    for (r, style) in layers {
        match marker {
            Marker::Circle => area.draw(&Circle::new(at, r, style))?,
            Marker::Triangle => area.draw(&TriangleMarker::new(at, r + 2, style))?,
            Marker::Square => {
                area.draw(&Rectangle::new([(x - r, y - r), (x + r, y + r)], style))?
            }
            Marker::Diamond => {
                let d = r + 1;
                let corners = vec![(x, y - d), (x + d, y), (x, y + d), (x - d, y), (x, y - d)];
                if style.filled {
                    area.draw(&Polygon::new(corners, style))?;
                } else {
                    area.draw(&PathElement::new(corners, style))?;
                }
            }
        }
    }
    Ok(())
}

/// How the decoding part is shown in the legend.
#[derive(Debug, Clone, Copy)]
enum DecodingSample {
    /// Filled and hollow markers.
    Fill,
    /// Solid and dashed lines.
    Line,
}

/// The legend on `area`: one section for each part with a value (its heading from
/// `headings`), one entry a line.
fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    styles: &Styles,
    headings: [&str; 3],
    decoding: DecodingSample,
) -> Result<(), Box<dyn Error>>
where
    DB::ErrorType: 'static,
{
    let text = ("sans-serif", 13).into_font();
    let heading = ("sans-serif", 13).into_font().color(&BLACK.mix(0.55));
    let grey = RGBColor(90, 90, 90);
    let mut y = 48;
    let parts = [&styles.models, &styles.storages, &styles.decodings];
    for (part, (values, title)) in parts.iter().zip(headings).enumerate() {
        if values.iter().all(String::is_empty) || title.is_empty() {
            continue;
        }
        area.draw(&Text::new(title.to_string(), (8, y), heading.clone()))?;
        y += 18;
        for (i, v) in values.iter().enumerate() {
            let at = (18, y + 7);
            match (part, decoding) {
                (0, _) => draw_marker(area, at, Marker::Circle, PALETTE[i % PALETTE.len()], true)?,
                (1, _) => draw_marker(area, at, MARKERS[i % MARKERS.len()], grey, true)?,
                (_, DecodingSample::Fill) => draw_marker(area, at, Marker::Circle, grey, i == 0)?,
                (_, DecodingSample::Line) => {
                    let ends = vec![(6, y + 7), (30, y + 7)];
                    let style = grey.stroke_width(2);
                    if i == 0 {
                        area.draw(&PathElement::new(ends, style))?;
                    } else {
                        area.draw(&DashedPathElement::new(ends, 5, 3, style))?;
                    }
                }
            }
            area.draw(&Text::new(v.clone(), (38, y), text.clone()))?;
            y += 18;
        }
        y += 10;
    }
    Ok(())
}

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

/// Points, e.g. quality against latency or size, told apart by their [`Key`]s in a legend
/// beside the plot (no labels on the points, which pile up where points are close).
pub struct Scatter {
    /// Title above the chart.
    pub title: String,
    /// X axis label.
    pub x_desc: String,
    /// Y axis label.
    pub y_desc: String,
    /// `(x, y, what it is)`.
    pub points: Vec<(f64, f64, Key)>,
    /// The legend's headings of the key's three parts (an empty one is left out).
    pub headings: [&'static str; 3],
    /// Start the x axis at 0.
    pub x_from_zero: bool,
}

impl Chart for Scatter {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), Box<dyn Error>>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let (plot, side) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
        let styles = Styles::of(self.points.iter().map(|p| &p.2));
        let xs = padded(self.points.iter().map(|p| p.0), 1e-3);
        let x_range = if self.x_from_zero {
            0.0..xs.end.max(1e-3)
        } else {
            xs
        };
        let y_range = padded(self.points.iter().map(|p| p.1), 0.02);
        let chart = axes(
            &plot,
            &self.title,
            &self.x_desc,
            &self.y_desc,
            x_range,
            y_range,
        )?;
        for (x, y, key) in &self.points {
            let at = chart.backend_coord(&(*x, *y));
            draw_marker(
                &plot,
                at,
                styles.marker(key),
                styles.color(key),
                styles.plain(key),
            )?;
        }
        legend(&side, &styles, self.headings, DecodingSample::Fill)
    }
}

/// Lines over a shared x axis, e.g. throughput against concurrency, told apart by their
/// [`Key`]s in a legend beside the plot.
pub struct Lines {
    /// Title above the chart.
    pub title: String,
    /// X axis label.
    pub x_desc: String,
    /// Y axis label.
    pub y_desc: String,
    /// `(what it is, points)`.
    pub series: Vec<(Key, Vec<(f64, f64)>)>,
    /// The legend's headings of the key's three parts (an empty one is left out).
    pub headings: [&'static str; 3],
}

impl Chart for Lines {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), Box<dyn Error>>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let (plot, side) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
        let styles = Styles::of(self.series.iter().map(|s| &s.0));
        let all = self.series.iter().flat_map(|s| s.1.iter().copied());
        let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
        let y_max = all.map(|p| p.1).fold(1e-3, f64::max);
        let mut chart = axes(
            &plot,
            &self.title,
            &self.x_desc,
            &self.y_desc,
            0.0..x_max * 1.05,
            0.0..y_max * 1.1,
        )?;
        for (key, points) in &self.series {
            let style = styles.color(key).stroke_width(2);
            if styles.plain(key) {
                chart.draw_series(LineSeries::new(points.iter().copied(), style))?;
            } else {
                chart.draw_series(DashedLineSeries::new(points.iter().copied(), 8, 5, style))?;
            }
            for p in points {
                let at = chart.backend_coord(p);
                draw_marker(&plot, at, styles.marker(key), styles.color(key), true)?;
            }
        }
        legend(&side, &styles, self.headings, DecodingSample::Line)
    }
}

/// Points and lines on one plot, e.g. runs with the curves of a law fitted to them: each
/// point a marker, each series a line without markers drawn over them and clipped to the
/// points' frame, told apart by their [`Key`]s in a legend beside the plot (lines solid or
/// dashed by the key's third part).
pub struct Overlay {
    /// Title above the chart.
    pub title: String,
    /// X axis label.
    pub x_desc: String,
    /// Y axis label.
    pub y_desc: String,
    /// `(x, y, what it is)`.
    pub points: Vec<(f64, f64, Key)>,
    /// `(what it is, points)`, drawn as lines.
    pub series: Vec<(Key, Vec<(f64, f64)>)>,
    /// The legend's headings of the key's three parts (an empty one is left out).
    pub headings: [&'static str; 3],
}

impl Chart for Overlay {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), Box<dyn Error>>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let (plot, side) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
        let keys = self.points.iter().map(|p| &p.2);
        let styles = Styles::of(keys.chain(self.series.iter().map(|s| &s.0)));
        // The frame is the points'; lines alone set it only when there are no points.
        let framing: Vec<(f64, f64)> = if self.points.is_empty() {
            self.series
                .iter()
                .flat_map(|s| s.1.iter().copied())
                .collect()
        } else {
            self.points.iter().map(|p| (p.0, p.1)).collect()
        };
        let x_range = padded(framing.iter().map(|p| p.0), 1e-3);
        let y_range = padded(framing.iter().map(|p| p.1), 1e-3);
        let mut chart = axes(
            &plot,
            &self.title,
            &self.x_desc,
            &self.y_desc,
            x_range.clone(),
            y_range.clone(),
        )?;
        for (x, y, key) in &self.points {
            let at = chart.backend_coord(&(*x, *y));
            draw_marker(&plot, at, styles.marker(key), styles.color(key), true)?;
        }
        // Lines are clipped to the frame: plotters would draw them past the axes.
        let inside = |p: &(f64, f64)| x_range.contains(&p.0) && y_range.contains(&p.1);
        for (key, points) in &self.series {
            let style = styles.color(key).stroke_width(2);
            let shown = points.iter().copied().filter(inside);
            if styles.plain(key) {
                chart.draw_series(LineSeries::new(shown, style))?;
            } else {
                chart.draw_series(DashedLineSeries::new(shown, 8, 5, style))?;
            }
        }
        legend(&side, &styles, self.headings, DecodingSample::Line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(model: &str, storage: &str, decoding: &str) -> Key {
        Key {
            model: model.into(),
            storage: storage.into(),
            decoding: decoding.into(),
        }
    }

    #[test]
    fn each_part_of_a_key_picks_one_style() {
        let keys = [
            key("base", "q4", "greedy"),
            key("dates", "q8", "sample"),
            key("base", "q8", "greedy"),
        ];
        let s = Styles::of(keys.iter());
        assert_eq!(s.models, ["base", "dates"]);
        assert_eq!(s.color(&keys[0]), s.color(&keys[2]), "colour by model");
        assert_ne!(s.color(&keys[0]), s.color(&keys[1]));
        assert!(matches!(s.marker(&keys[0]), Marker::Circle));
        assert!(
            matches!(s.marker(&keys[2]), Marker::Triangle),
            "marker by storage"
        );
        assert!(
            s.plain(&keys[0]) && !s.plain(&keys[1]),
            "filled or solid by decoding"
        );
    }

    #[test]
    fn charts_are_written_as_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let scatter = Scatter {
            title: "t".into(),
            x_desc: "x".into(),
            y_desc: "y".into(),
            points: vec![
                (0.5, 0.9, key("a", "q4", "greedy")),
                (0.7, 0.4, key("b", "q8", "sample")),
            ],
            headings: ["model", "storage", "decoding"],
            x_from_zero: true,
        };
        scatter.save(&dir.path().join("s")).unwrap();
        let lines = Lines {
            title: "t".into(),
            x_desc: "x".into(),
            y_desc: "y".into(),
            series: vec![
                (key("a", "q4", "greedy"), vec![(1.0, 10.0), (8.0, 30.0)]),
                (key("b", "q8", "sample"), vec![(1.0, 8.0), (8.0, 20.0)]),
            ],
            headings: ["model", "storage", "decoding"],
        };
        lines.save(&dir.path().join("l")).unwrap();
        let overlay = Overlay {
            title: "t".into(),
            x_desc: "x".into(),
            y_desc: "y".into(),
            points: vec![(1.0, 2.0, key("runs", "", ""))],
            series: vec![(key("law", "", ""), vec![(0.0, 3.0), (2.0, 1.0), (9.0, 0.0)])],
            headings: ["", "", ""],
        };
        overlay.save(&dir.path().join("o")).unwrap();
        for f in ["s.svg", "l.svg", "o.svg"] {
            let svg = std::fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("<text"), "{f}");
        }
        for f in ["s.png", "l.png", "o.png"] {
            let png = std::fs::read(dir.path().join(f)).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{f}");
            assert!(png.len() > 2000, "{f} has drawing in it");
        }
    }
}
