/*
 * METEOR 1.5's "-stdio" line protocol (SCORE / EVAL / SING, the one pycocoevalcap speaks), answered by
 * several threads that share one loaded scorer.
 *
 * Meteor's own stdio loop (Meteor.scoreStdio) scores one SCORE line at a time on one thread. Here every
 * line becomes a task of a thread pool and the answers are written in input order, so the output is
 * line for line what Meteor's loop prints: the same MeteorScorer calls on the same strings, only on
 * several threads. Each worker holds its own scorer made with Meteor's copy constructor
 * MeteorScorer(MeteorScorer), which gives it a fresh stemmer and shares the read-only tables
 * (paraphrase transducer, synonyms, function words), so the paraphrase table is loaded once.
 *
 * Usage (arguments after the thread count are Meteor's own):
 *   java -cp meteor-1.5.jar:DIR MeteorParallel THREADS - - -stdio -l en -norm
 */

import edu.cmu.meteor.scorer.MeteorConfiguration;
import edu.cmu.meteor.scorer.MeteorScorer;
import edu.cmu.meteor.scorer.MeteorStats;
import java.io.BufferedOutputStream;
import java.io.BufferedReader;
import java.io.FileOutputStream;
import java.io.FileDescriptor;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.util.ArrayList;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.LinkedBlockingQueue;

public final class MeteorParallel {
    private static final Future<String> END = new java.util.concurrent.CompletableFuture<>();

    public static void main(String[] args) throws Exception {
        int threads = Integer.parseInt(args[0]);
        if (threads < 1) {
            throw new IllegalArgumentException("thread count must be >= 1, got " + threads);
        }
        // args[1], args[2] are Meteor's test/reference file names ("-" "-"); its options start after them
        Properties props = Meteor.createPropertiesFromArgs(args, 3);
        MeteorScorer base = new MeteorScorer(new MeteorConfiguration(props));
        // Normalizer fills a static table of non-breaking prefixes on first use: fill it on this thread
        // before the workers start, so that they only read it.
        ArrayList<String> warmRef = new ArrayList<>();
        warmRef.add("a warm-up line .");
        base.getMeteorStats("a warm-up line .", warmRef);

        ThreadLocal<MeteorScorer> scorer = ThreadLocal.withInitial(() -> new MeteorScorer(base));
        ExecutorService pool = Executors.newFixedThreadPool(threads, r -> {
            Thread t = new Thread(r, "meteor-worker");
            t.setDaemon(true);
            return t;
        });
        LinkedBlockingQueue<Future<String>> answers = new LinkedBlockingQueue<>();
        PrintStream out = new PrintStream(
                new BufferedOutputStream(new FileOutputStream(FileDescriptor.out), 1 << 16), false, "UTF-8");
        Thread writer = new Thread(() -> {
            try {
                while (true) {
                    Future<String> next = answers.take();
                    if (next == END) {
                        break;
                    }
                    out.print(next.get());
                    if (answers.isEmpty()) {
                        out.flush();  // nothing else queued: the client may be waiting for this answer
                    }
                }
            } catch (Exception e) {
                e.printStackTrace();
                System.exit(1);
            } finally {
                out.flush();
            }
        }, "meteor-writer");
        writer.start();

        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, "UTF-8"), 1 << 16);
        String line;
        while ((line = in.readLine()) != null) {
            final String request = line;
            answers.put(pool.submit(() -> answer(scorer.get(), request)));
        }
        answers.put(END);
        writer.join();
        pool.shutdownNow();
    }

    /** What Meteor.scoreStdio prints for one input line, including its line break(s). */
    static String answer(MeteorScorer scorer, String line) {
        String nl = System.lineSeparator();
        if (line.startsWith("SCORE") || line.startsWith("score")) {
            String[] parts = line.split("\\|\\|\\|");
            if (parts.length < 3) {
                return "Error: specify hypothesis and at least one reference" + nl;
            }
            ArrayList<String> refs = new ArrayList<>();
            for (int i = 1; i < parts.length - 1; i++) {
                refs.add(parts[i].trim());
            }
            String hyp = parts[parts.length - 1].trim();
            return scorer.getMeteorStats(hyp, refs).toString() + nl;
        }
        if (line.startsWith("EVAL") || line.startsWith("eval")) {
            String[] parts = line.split("\\|\\|\\|");
            if (parts.length < 2) {
                return "Error: specify Meteor stats" + nl;
            }
            StringBuilder sb = new StringBuilder();
            MeteorStats total = new MeteorStats();
            for (int i = 1; i < parts.length; i++) {
                MeteorStats stats = new MeteorStats(parts[i].trim());
                scorer.computeMetrics(stats);
                sb.append(String.valueOf(stats.score)).append(nl);
                total.addStats(stats);
            }
            scorer.computeMetrics(total);
            sb.append(String.valueOf(total.score)).append(nl);
            return sb.toString();
        }
        if (line.startsWith("SING") || line.startsWith("sing")) {
            String[] parts = line.split("\\|\\|\\|");
            if (parts.length != 2) {
                return "Error: specify Meteor stats" + nl;
            }
            MeteorStats stats = new MeteorStats(parts[1].trim());
            scorer.computeMetrics(stats);
            return String.valueOf(stats.score) + nl;
        }
        return "Error: specify SCORE or EVAL or SING" + nl;
    }
}
