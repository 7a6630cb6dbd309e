# bench/plot_load.gp: latency percentiles against achieved throughput, batching on vs off.
# Called by bench/run:  gnuplot -e "dir='RESULTS'; bound=50; title_extra='...'" plot_load.gp
# Reads dir/load-sweep-{batched,unbatched}.tsv (columns: 6 ok/s, 7 p50, 8 p90, 9 p99, 10 p99.9,
# 13 mean batch) and writes dir/load-latency.png and dir/load-batch.png.
set terminal pngcairo size 1100,700 font "DejaVu Sans,11" noenhanced
set datafile separator "\t"
set datafile commentschars "#"
set grid
set key bottom right box opaque

set output dir."/load-latency.png"
set title "Affinity: latency vs achieved throughput (open loop, Search k=10)\n".title_extra
set xlabel "achieved throughput (successful calls/s, log scale)"
set ylabel "latency (ms, log scale)"
set logscale xy
set arrow 1 from graph 0, first bound to graph 1, first bound nohead dt 2 lw 2 lc rgb "red"
set label 1 sprintf("p99 bound %g ms", bound) at graph 0.02, first bound*1.15 tc rgb "red"
b = dir."/load-sweep-batched.tsv"
u = dir."/load-sweep-unbatched.tsv"
plot b using 6:7 smooth unique with linespoints lw 2 pt 7 lc rgb "#1f77b4" title "batching on: p50", \
     b using 6:9 smooth unique with linespoints lw 2 pt 5 lc rgb "#1f77b4" dt 2 title "batching on: p99", \
     b using 6:10 smooth unique with linespoints lw 1 pt 4 lc rgb "#1f77b4" dt 3 title "batching on: p99.9", \
     u using 6:7 smooth unique with linespoints lw 2 pt 7 lc rgb "#ff7f0e" title "max_batch=1: p50", \
     u using 6:9 smooth unique with linespoints lw 2 pt 5 lc rgb "#ff7f0e" dt 2 title "max_batch=1: p99", \
     u using 6:10 smooth unique with linespoints lw 1 pt 4 lc rgb "#ff7f0e" dt 3 title "max_batch=1: p99.9"

set output dir."/load-batch.png"
set title "Server batch size vs load (GetServerInfo batch_stats)\n".title_extra
set ylabel "mean requests per engine batch"
unset logscale y
unset arrow 1
unset label 1
plot b using 6:13 smooth unique with linespoints lw 2 pt 7 lc rgb "#1f77b4" title "batching on", \
     u using 6:13 smooth unique with linespoints lw 2 pt 7 lc rgb "#ff7f0e" title "max_batch=1"
