//! Plots as standalone SVG documents: grouped bar charts (metrics per run) and line charts
//! (loss curves, sorted per-query values). No dependencies, no JavaScript; the files open in
//! any browser and embed in HTML.

use std::fmt::Write;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 360.0;
const MARGIN: (f64, f64, f64, f64) = (56.0, 16.0, 40.0, 64.0); // left, right, top, bottom
/// Colour-blind-safe palette (Okabe-Ito).
const COLOURS: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
];

/// One named series of values.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

/// Text for an XML or HTML element or attribute value.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn header(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        WIDTH / 2.0,
        escape(title)
    )
}

/// A "nice" upper bound and tick step for values up to `max`.
fn scale(max: f64) -> (f64, f64) {
    if max <= 0.0 || !max.is_finite() {
        return (1.0, 0.2);
    }
    let magnitude = 10f64.powf(max.log10().floor());
    let step = [0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|s| s * magnitude)
        .find(|s| max / s <= 6.0)
        .unwrap_or(magnitude * 10.0);
    ((max / step).ceil() * step, step)
}

fn y_axis(svg: &mut String, min: f64, max: f64, step: f64, label: &str) {
    let (left, right, top, bottom) = MARGIN;
    let plot_h = HEIGHT - top - bottom;
    let mut tick = min;
    while tick <= max + step * 1e-9 {
        let y = top + plot_h * (1.0 - (tick - min) / (max - min));
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - right,
            left - 6.0,
            y + 4.0,
            format_tick(tick)
        );
        tick += step;
    }
    let _ = writeln!(
        svg,
        "<text transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        top + plot_h / 2.0,
        escape(label)
    );
}

fn format_tick(v: f64) -> String {
    let text = format!("{v:.4}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn legend(svg: &mut String, names: &[&str]) {
    let mut x = MARGIN.0;
    for (i, name) in names.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\">{}</text>",
            HEIGHT - 18.0,
            COLOURS[i % COLOURS.len()],
            x + 14.0,
            HEIGHT - 9.0,
            escape(name)
        );
        x += 24.0 + 7.0 * name.chars().count() as f64;
    }
}

/// Bars grouped by category (e.g. measures), one bar per series (e.g. runs) in each group.
pub(crate) fn grouped_bars(
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[Series],
) -> String {
    let (left, right, top, bottom) = MARGIN;
    let (plot_w, plot_h) = (WIDTH - left - right, HEIGHT - top - bottom);
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .fold(0.0, f64::max);
    let (y_max, step) = scale(max);
    let mut svg = header(title);
    y_axis(&mut svg, 0.0, y_max, step, y_label);
    let group_w = plot_w / categories.len().max(1) as f64;
    let bar_w = group_w * 0.8 / series.len().max(1) as f64;
    for (c, category) in categories.iter().enumerate() {
        let x0 = left + group_w * c as f64 + group_w * 0.1;
        for (s, serie) in series.iter().enumerate() {
            let value = serie.values.get(c).copied().unwrap_or(0.0);
            let h = plot_h * value / y_max;
            let x = x0 + bar_w * s as f64;
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{}: {value:.4}</title></rect>",
                top + plot_h - h,
                (bar_w - 2.0).max(1.0),
                COLOURS[s % COLOURS.len()],
                escape(&serie.name)
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x0 + group_w * 0.4,
            top + plot_h + 16.0,
            escape(category)
        );
    }
    legend(
        &mut svg,
        &series.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
    );
    svg.push_str("</svg>\n");
    svg
}

/// Lines over x = 1..n (per-query values sorted, steps of training), one per series.
pub fn lines(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (left, right, top, bottom) = MARGIN;
    let (plot_w, plot_h) = (WIDTH - left - right, HEIGHT - top - bottom);
    let values = || {
        series
            .iter()
            .flat_map(|s| s.values.iter().copied())
            .filter(|v| v.is_finite())
    };
    let y_min = values().fold(0.0, f64::min);
    let (y_max, step) = scale(values().fold(0.0, f64::max));
    let n = series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let mut svg = header(title);
    y_axis(&mut svg, y_min.min(0.0), y_max, step, y_label);
    let x_of = |i: usize| left + plot_w * i as f64 / (n - 1) as f64;
    let y_of = |v: f64| top + plot_h * (1.0 - (v - y_min.min(0.0)) / (y_max - y_min.min(0.0)));
    for (s, serie) in series.iter().enumerate() {
        let points: Vec<String> = serie
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| format!("{:.1},{:.1}", x_of(i), y_of(v)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>",
            COLOURS[s % COLOURS.len()],
            points.join(" ")
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        left + plot_w / 2.0,
        top + plot_h + 20.0,
        escape(x_label)
    );
    legend(
        &mut svg,
        &series.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
    );
    svg.push_str("</svg>\n");
    svg
}
