"""data.prepare as an Apache Beam pipeline (`--runner=beam`, the `[beam]` extra): the same shards, written by Beam's
workers, for corpora that outgrow one machine.

    files --count their documents (a worker per file)--> counts, a side input
    files --read, each document numbered from its file's first index (the counts of the files before it)-->
          (shard = index // documents_per_shard, (index, document))        shards already written are dropped
          --GroupByKey--> a shard's documents in index order --> tokenized and written (data.prepare.write_shard)

Document i goes to shard i // documents_per_shard as with the default runner, so the shards are the same bytes
(tested on Beam's DirectRunner, which runs the pipeline in this process). The driver then writes the manifest as the
default runner does. `--beam_options` are Beam's pipeline options, e.g. "--runner=DataflowRunner --project=P
--region=R --temp_location=gs://..." (or FlinkRunner, SparkRunner): the workers must see the inputs and `--out`
(a shared file system or a mounted bucket), and have this package installed.
"""

import shlex

from data import corpus_files


def write_shards(files: list[str], text_field: str, documents_per_shard: int, done: set[int], beam_options: str, *,
                 start_worker, write_shard, input_error: type[Exception]) -> None:
    """Runs the pipeline to completion: every shard not in `done` written by `write_shard((index, documents))`
    (data.prepare's, which notes it in .progress) on workers set up by `start_worker()`; a failure caused by bad
    input is raised as one line of `input_error` (data.prepare's PrepareError)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    order = {path: i for i, path in enumerate(files)}

    def count(path):
        return path, sum(1 for _ in corpus_files.documents(path, text_field))

    def numbered(path, counts):
        first = sum(counts[p] for p in files[:order[path]])
        for index, (document, _) in enumerate(corpus_files.documents(path, text_field), start=first):
            yield index // documents_per_shard, (index, document)

    class WriteShard(beam.DoFn):
        def setup(self):
            start_worker()  # the tokenizer, once per Beam worker

        def process(self, shard_and_documents):
            shard, documents = shard_and_documents
            yield write_shard((shard, [d for _, d in sorted(documents)]))

    options = PipelineOptions(shlex.split(beam_options) or ["--runner=DirectRunner"])
    try:
        with beam.Pipeline(options=options) as pipeline:
            paths = pipeline | "files" >> beam.Create(files)
            counts = paths | "count" >> beam.Map(count)
            _ = (paths
                 | "number" >> beam.FlatMap(numbered, counts=beam.pvalue.AsDict(counts))
                 | "not written yet" >> beam.Filter(lambda item: item[0] not in done)
                 | "by shard" >> beam.GroupByKey()
                 | "write" >> beam.ParDo(WriteShard()))
    except Exception as error:  # a worker's failure arrives wrapped in Beam's own; its first cause is the one line
        raise input_error(_first_cause(error, (corpus_files.CorpusError, input_error))) from error


def _first_cause(error: BaseException, input_errors: tuple) -> str:
    """The input error that a Beam failure wraps, as one line."""
    seen = error
    while seen is not None:
        if isinstance(seen, input_errors):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    for name in (f"{kind.__name__}: " for kind in input_errors):
        lines = [line for line in str(error).splitlines() if name in line]
        if lines:
            return lines[-1].split(name, 1)[1]
    return str(error).splitlines()[0] if str(error) else repr(error)
