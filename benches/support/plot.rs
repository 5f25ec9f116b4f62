//! The benchmarks' plots: line charts drawn as SVG by the benchmark that measured them, into
//! `DISCUS_BENCH_PLOTS` (docs/plots when publishing) or else `plots/` beside the benchmark's
//! binary, so a reader sees a run's shape without reading its table.
#![allow(clippy::expect_used, dead_code)] // benchmarks fail by panicking; not every bench draws

use std::path::PathBuf;

use plotters::prelude::*;

/// One line of a chart: its legend and its points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart: title, axis labels and its lines.
pub struct Chart<'a> {
    pub file: &'a str,
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    pub series: Vec<Series>,
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
];

/// Where plots go: `DISCUS_BENCH_PLOTS`, or `plots/` beside the benchmark's build folder.
pub fn folder() -> PathBuf {
    let folder = std::env::var_os("DISCUS_BENCH_PLOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("the benchmark's path");
            let build = exe.ancestors().nth(2).expect("target/<profile>");
            build.join("plots")
        });
    std::fs::create_dir_all(&folder).expect("plot folder");
    folder
}

/// Draws `chart` as `<folder>/<file>`; returns its path.
pub fn draw(chart: &Chart<'_>) -> PathBuf {
    let path = folder().join(chart.file);
    let (x_max, y_max) = chart
        .series
        .iter()
        .flat_map(|s| &s.points)
        .fold((0.0f64, 0.0f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
    let root = SVGBackend::new(&path, (800, 450)).into_drawing_area();
    root.fill(&WHITE).expect("background");
    let mut context = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max.max(1e-9) * 1.02, 0.0..y_max.max(1e-9) * 1.1)
        .expect("chart");
    context
        .configure_mesh()
        .x_desc(chart.x)
        .y_desc(chart.y)
        .draw()
        .expect("axes");
    for (series, colour) in chart.series.iter().zip(COLOURS.iter().cycle()) {
        let colour = *colour;
        context
            .draw_series(LineSeries::new(
                series.points.iter().copied(),
                colour.stroke_width(2),
            ))
            .expect("line")
            .label(series.label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    context
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .expect("legend");
    root.present().expect("svg written");
    drop(context);
    drop(root);
    path
}

/// Counts of events at `times` (seconds) in buckets of `width` seconds, as points.
pub fn rate(times: &[f64], width: f64, until: f64) -> Vec<(f64, f64)> {
    let buckets = (until / width).ceil().max(1.0) as usize;
    let mut counts = vec![0usize; buckets];
    for t in times.iter().filter(|t| **t >= 0.0) {
        let i = ((t / width) as usize).min(buckets - 1);
        counts[i] += 1;
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, c)| (i as f64 * width, *c as f64 / width))
        .collect()
}

/// The share of `values` at or below each value: a CDF's points.
pub fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    sorted
        .iter()
        .enumerate()
        .map(|(i, v)| (*v, (i + 1) as f64 / n))
        .collect()
}
