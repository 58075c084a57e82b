-- The documents judged in a qrels table, as a corpus table (for building small corpora that
-- still contain every relevant document). Inputs: `qrels` and `corpus`.
SELECT DISTINCT c.doc_id, c.title, c.text
FROM corpus AS c
JOIN qrels AS q ON q.doc_id = c.doc_id
ORDER BY c.doc_id
