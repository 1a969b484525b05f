from pkt_bench.cli import main

main()
