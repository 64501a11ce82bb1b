"""What a job is: the spec types, the registry of job kinds, checkpoint kinds, model references, the submitted-job record and the pre-submit checks."""
