"""The producer side: what backend services use to queue jobs and read them back.

``Client`` (``worker.producer.client``) is the Python API; ``Producer``
(``worker.producer.producer``) is the minimal layer it and the CLI build on. Neither imports
the steps or the Celery tasks: they write the job store and publish ``runcomfy.submit``.
"""
