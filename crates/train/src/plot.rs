//! `loss.png`: training and validation loss against the optimizer step, drawn with plotters'
//! bitmap backend and encoded with the png crate, written atomically.
//!
//! Text needs a TrueType font, which plotters' `ab_glyph` feature takes as bytes: the first of
//! `$RUPANTOR_PLOT_FONT` and a few usual system locations (DejaVu / Liberation Sans, Arial) that
//! exists is loaded once. Without one the curves are still drawn, without caption, tick labels
//! or legend, and [`PlotOutcome::labelled`] says so.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::fsutil::write_atomic;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 540;

/// Where a font is looked for, after `$RUPANTOR_PLOT_FONT`.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// The font registered with plotters, if any (once per process).
fn font() -> Option<&'static Path> {
    static FONT: OnceLock<Option<PathBuf>> = OnceLock::new();
    FONT.get_or_init(|| {
        let env = std::env::var_os("RUPANTOR_PLOT_FONT").map(PathBuf::from);
        env.into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .find_map(|p| {
                let bytes = std::fs::read(&p).ok()?;
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .ok()
                    .map(|_| p)
            })
    })
    .as_deref()
}

/// What was drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOutcome {
    /// Caption, axis labels and legend were drawn (a font was found).
    pub labelled: bool,
    pub font: Option<PathBuf>,
}

/// Draws `train` (step, loss) and `val` (step, loss) into an RGB buffer; `labelled` asks for
/// text (requires a registered font).
fn draw(train: &[(u64, f64)], val: &[(u64, f64)], labelled: bool) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        let finite = |v: &(u64, f64)| v.1.is_finite();
        let points = train.iter().chain(val).filter(|v| finite(v));
        let (mut lo, mut hi, mut last) = (f64::INFINITY, f64::NEG_INFINITY, 1u64);
        for &(s, l) in points {
            lo = lo.min(l);
            hi = hi.max(l);
            last = last.max(s);
        }
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let (y0, y1) = (lo - pad, hi + pad);
        let mut builder = ChartBuilder::on(&root);
        builder.margin(16);
        if labelled {
            builder
                .caption("loss", ("sans-serif", 22))
                .x_label_area_size(40)
                .y_label_area_size(60);
        }
        let mut chart = builder
            .build_cartesian_2d(0u64..last, y0..y1)
            .map_err(|e| anyhow!("plot: {e}"))?;
        if labelled {
            chart
                .configure_mesh()
                .x_desc("optimizer step")
                .y_desc("mean token NLL")
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(|e| anyhow!("plot: {e}"))?;
        } else {
            // Grid lines only: every text element needs a font.
            let grey = RGBColor(225, 225, 225);
            for k in 0..=4 {
                let y = y0 + (y1 - y0) * k as f64 / 4.0;
                chart
                    .draw_series(LineSeries::new([(0, y), (last, y)], grey))
                    .map_err(|e| anyhow!("plot: {e}"))?;
            }
        }
        let blue = RGBColor(31, 119, 180);
        let orange = RGBColor(255, 127, 14);
        let series = chart
            .draw_series(LineSeries::new(
                train.iter().copied().filter(finite),
                blue.stroke_width(2),
            ))
            .map_err(|e| anyhow!("plot: {e}"))?;
        if labelled {
            series
                .label("train")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], blue));
        }
        let series = chart
            .draw_series(LineSeries::new(
                val.iter().copied().filter(finite),
                orange.stroke_width(2),
            ))
            .map_err(|e| anyhow!("plot: {e}"))?;
        if labelled {
            series
                .label("validation")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], orange));
        }
        chart
            .draw_series(
                val.iter()
                    .copied()
                    .filter(finite)
                    .map(|p| Circle::new(p, 4, orange.filled())),
            )
            .map_err(|e| anyhow!("plot: {e}"))?;
        if labelled {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(|e| anyhow!("plot: {e}"))?;
        }
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    Ok(buf)
}

fn encode_png(rgb: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, WIDTH, HEIGHT);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(rgb)?;
    }
    Ok(out)
}

/// Writes the loss curves to `path` (atomically).
pub fn plot_losses(path: &Path, train: &[(u64, f64)], val: &[(u64, f64)]) -> Result<PlotOutcome> {
    let font = font();
    let rgb = draw(train, val, font.is_some())?;
    write_atomic(path, &encode_png(&rgb)?)?;
    Ok(PlotOutcome {
        labelled: font.is_some(),
        font: font.map(Path::to_path_buf),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Curve = Vec<(u64, f64)>;

    fn curves() -> (Curve, Curve) {
        let train: Vec<(u64, f64)> = (1..=40)
            .map(|s| (s, 3.0 / (1.0 + s as f64 * 0.1)))
            .collect();
        let val = vec![(10, 2.2), (20, 1.9), (30, 1.95), (40, f64::NAN)];
        (train, val)
    }

    /// Pixels of roughly the given colour.
    fn count(rgb: &[u8], c: (u8, u8, u8)) -> usize {
        rgb.chunks_exact(3)
            .filter(|p| {
                p[0].abs_diff(c.0) < 40 && p[1].abs_diff(c.1) < 40 && p[2].abs_diff(c.2) < 40
            })
            .count()
    }

    #[test]
    fn draws_both_curves_with_or_without_text() {
        let (train, val) = curves();
        for labelled in [false, true] {
            if labelled && font().is_none() {
                continue; // no system font here; the unlabelled path is covered
            }
            let rgb = draw(&train, &val, labelled).unwrap();
            assert!(
                count(&rgb, (31, 119, 180)) > 300,
                "train curve, labelled {labelled}"
            );
            assert!(
                count(&rgb, (255, 127, 14)) > 100,
                "validation curve, labelled {labelled}"
            );
        }
    }

    #[test]
    fn writes_a_png_atomically() {
        let (train, val) = curves();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        let out = plot_losses(&p, &train, &val).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = dec.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (WIDTH, HEIGHT));
        assert_eq!(out.labelled, out.font.is_some());
        // Nothing drawable yet (a run killed before its first step) still gives a picture.
        plot_losses(&p, &[], &[]).unwrap();
    }
}
